"""Generated Triton kernels of the matrix memory, run by Triton's CPU interpreter, against the reference.

Every check runs the per-token reference interpreter (float64, the oracle) and the generated kernel on the
same leaves, and compares outputs, the final state and the gradients of every input and of the initial
state, with DESIGN §3's tolerances: relative RMS error ≤ 1e-5 in float32; ≤ 6e-3 (outputs) and ≤ 8e-3
(gradients) in bfloat16, where the leaves are bfloat16 values so both sides see the same inputs.
Shapes stay within §7's interpreter limits (batch × heads ≤ 4, T ≤ 512).

Triton decides between interpreting and compiling when a @triton.jit function is defined, and its own
language helpers (the combine function of tl.sum, ...) are defined when triton.language is first imported;
a process is therefore one or the other. This module sets TRITON_INTERPRET=1 before anything imports
Triton (no other test module imports it at collection time) and checks that it took effect; the
ahead-of-time compilation test (test_kernels_codegen.py) runs in a subprocess without it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

if "triton.language" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

tl = pytest.importorskip("triton.language", reason="the kernel tests need triton (a project dependency on Linux)")

from nestc.codegen import install  # noqa: E402
from nestc_runtime.kernels import source  # noqa: E402
from nestc_runtime.ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState, chunked, scan  # noqa: E402
from nestc_runtime.ops.matrix_memory import triton as kernels  # noqa: E402

F32_TOL = 1e-5
BF16_OUT_TOL, BF16_GRAD_TOL = 6e-3, 8e-3


@pytest.fixture(autouse=True, scope="module")
def _interpreter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard._sum_combine, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: run this module in its own process")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("NESTC_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernel-cache")))
        install()
        yield
        source.use_generator(None)


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _leaves(batch: int, heads: int, steps: int, d: int, dtype: torch.dtype, seed: int) -> list[Tensor]:
    """q, k (unit norm), v, η ∈ (0, 0.6), α ∈ (0.9, 1) and β ∈ (0.5, 0.9) per head, θ_init: values representable
    in `dtype` (β is used by momentum_gd only)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, steps, d, generator=g)
    k = torch.nn.functional.normalize(torch.randn(batch, heads, steps, d, generator=g), dim=-1)
    v = torch.randn(batch, heads, steps, d, generator=g)
    lr = 0.6 * torch.rand(batch, heads, steps, generator=g)
    retain = 1 - 0.1 * torch.rand(batch, heads, steps, generator=g)
    beta = 0.5 + 0.4 * torch.rand(batch, heads, steps, generator=g)
    init = 0.3 * torch.randn(heads, d, d, generator=g)
    return [x.to(dtype).to(torch.float64).requires_grad_() for x in (q, k, v, lr, retain, beta, init)]


def _run(op, leaves: list[Tensor], cfg: MatrixMemoryConfig, dtype: torch.dtype, lengths: Tensor | None = None):
    q, k, v, lr, retain, beta, init = (x.to(dtype) for x in leaves)
    beta = beta if cfg.optimizer == "momentum_gd" else None
    o, state = op(q, k, v, lr, retain, MatrixMemoryState.initial(init, q.shape[0]), cfg, lengths, momentum=beta)
    weights = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o)
    loss = (o.double() * weights).sum() + (state.S.double() * state.S.double().detach()).sum()
    loss = loss + (state.momentum.double() * state.momentum.double().detach()).sum()
    return o, state, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def _compare(
    cfg: MatrixMemoryConfig,
    steps: int,
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
    heads: int = 2,
    d: int = 16,
    lengths: Tensor | None = None,
    seed: int = 0,
) -> None:
    leaves = _leaves(batch, heads, steps, d, dtype, seed)
    o_ref, s_ref, g_ref = _run(scan, leaves, cfg, torch.float64, lengths)
    probe = MatrixMemoryState.initial(leaves[-1].detach().to(dtype), batch)
    assert kernels.why_not(cfg, leaves[0].to(dtype), leaves[4].to(dtype), probe, leaves[5].to(dtype)) is None
    o, s, grads = _run(kernels.triton_chunked, leaves, cfg, dtype, lengths)
    out_tol, grad_tol = (F32_TOL, F32_TOL) if dtype == torch.float32 else (BF16_OUT_TOL, BF16_GRAD_TOL)
    assert o.dtype == dtype
    assert _rel(o, o_ref) <= out_tol
    assert _rel(s.S, s_ref.S) <= out_tol
    assert _rel(s.momentum, s_ref.momentum) <= out_tol or cfg.optimizer != "momentum_gd"
    if cfg.chunk > 1:  # at C = 1 every chunk is complete: P and log_decay are never read again
        assert _rel(s.P, s_ref.P) <= out_tol
        assert _rel(s.log_decay, s_ref.log_decay) <= out_tol
    assert torch.equal(s.phase, s_ref.phase) and torch.equal(s.chunks_done, s_ref.chunks_done)
    for name, got, want in zip(("q", "k", "v", "lr", "retain", "momentum", "init"), grads, g_ref):
        assert _rel(got, want) <= grad_tol, name


def _cfg(objective: str, optimizer: str, decay: str, read: str, chunk: int, grad: str = "through"):
    return MatrixMemoryConfig(objective=objective, decay=decay, chunk=chunk, read=read, optimizer=optimizer, grad=grad)


# Per token (C = 1): the delta rule (DeltaNet, Gated DeltaNet), linear attention, DGD; the within-block solve.
@pytest.mark.parametrize(
    ("objective", "optimizer", "decay", "read", "steps"),
    [
        ("l2", "gd", "after", "online", 63),  # DeltaNet with retention after
        ("l2", "gd", "before", "online", 65),  # Gated DeltaNet
        ("dot", "gd", "after", "before", 65),  # linear attention with retention, read before
        ("l2", "dgd", "after", "boundary", 63),  # DGD: M(αI - 2ηkkᵀ) + ηvkᵀ
        ("dot", "dgd", "after", "online", 65),
    ],
)
def test_per_token_kernels_equal_reference_fp32(objective: str, optimizer: str, decay: str, read: str, steps: int):
    _compare(_cfg(objective, optimizer, decay, read, 1), steps)


# One chunk per block (C = 16): the Titans-style chunked gradient at the chunk-start state.
@pytest.mark.parametrize(
    ("objective", "optimizer", "decay", "read", "steps"),
    [
        ("l2", "gd", "after", "online", 33),
        ("l2", "gd", "before", "boundary", 47),
        ("dot", "gd", "before", "online", 17),
        ("l2", "dgd", "after", "before", 31),
    ],
)
def test_chunk_kernels_equal_reference_fp32(objective: str, optimizer: str, decay: str, read: str, steps: int):
    _compare(_cfg(objective, optimizer, decay, read, 16), steps)


# momentum_gd (Titans Eq. 13-14): per token (a coupled solve for `l2`) and one chunk per block.
@pytest.mark.parametrize(
    ("objective", "decay", "read", "chunk", "steps"),
    [
        ("l2", "after", "online", 16, 65),  # the Titans memory's optimizer on a matrix memory
        ("l2", "before", "before", 16, 33),
        ("dot", "before", "boundary", 16, 31),
        ("l2", "before", "online", 1, 63),
        ("dot", "after", "boundary", 1, 65),
    ],
)
def test_momentum_kernels_equal_reference_fp32(objective: str, decay: str, read: str, chunk: int, steps: int):
    _compare(_cfg(objective, "momentum_gd", decay, read, chunk), steps)


def test_momentum_variable_length_batch():
    """Padding is not a no-op for momentum_gd (S ← αS + m moves S even without a gradient): the kernel
    stops each row at its own length."""
    _compare(_cfg("l2", "momentum_gd", "after", "online", 1), 40, batch=2, lengths=torch.tensor([23, 40]))


@pytest.mark.parametrize(("objective", "decay", "chunk"), [("l2", "before", 1), ("l2", "after", 16)])
def test_kernels_equal_reference_bf16(objective: str, decay: str, chunk: int):
    _compare(_cfg(objective, "gd", decay, "online", chunk), 65, dtype=torch.bfloat16)


def test_variable_length_batch():
    """Rows of 65 and 40 tokens in one batch: padding leaves each row's state as its own length left it."""
    _compare(_cfg("l2", "gd", "before", "online", 16), 65, batch=2, lengths=torch.tensor([65, 40]))


def test_stop_gradient_mode():
    _compare(_cfg("l2", "gd", "after", "online", 1, grad="stop"), 40)


def test_streaming_continues_the_state():
    """Two calls (64 then 37 tokens, the first ending at a chunk end) equal one call of 101."""
    cfg = _cfg("l2", "gd", "before", "online", 16)
    q, k, v, lr, retain, _, init = (x.detach().float() for x in _leaves(1, 2, 101, 16, torch.float32, 3))
    whole, end = kernels.triton_chunked(q, k, v, lr, retain, MatrixMemoryState.initial(init, 1), cfg)
    state = MatrixMemoryState.initial(init, 1)
    parts = []
    for piece in (slice(0, 64), slice(64, 101)):
        out, state = kernels.triton_chunked(q[:, :, piece], k[:, :, piece], v[:, :, piece], lr[:, :, piece],
                                            retain[:, :, piece], state, cfg)  # fmt: skip
        parts.append(out)
    assert _rel(torch.cat(parts, 2), whole) <= F32_TOL
    assert _rel(state.S, end.S) <= F32_TOL and _rel(state.P, end.P) <= F32_TOL


def test_calls_without_a_kernel_say_why_and_run_the_chunked_path():
    q, k, v, lr, retain, _, init = (x.detach().float() for x in _leaves(1, 2, 8, 16, torch.float32, 4))
    state = MatrixMemoryState.initial(init, 1)
    cfg = _cfg("l2", "gd", "after", "online", 4)
    assert kernels.why_not(cfg, q, retain, state) == "no kernel for chunk 4 (kernels: 1, 16, 32, 64)"
    per_channel = retain[..., None].expand(*retain.shape, 16)
    assert kernels.why_not(_cfg("l2", "gd", "after", "online", 1), q, per_channel, state) is not None
    o, _ = kernels.triton_chunked(q, k, v, lr, retain, state, cfg)
    assert torch.equal(o, chunked(q, k, v, lr, retain, state, cfg)[0])


def test_without_generated_source_the_chunked_path_runs(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A runtime-only process (no compiler installed as generator, no compiled directory) runs the PyTorch path."""
    monkeypatch.setattr(source, "_generator", None)
    monkeypatch.setenv("NESTC_KERNEL_CACHE", str(tmp_path))
    q, k, v, lr, retain, _, init = (x.detach().float() for x in _leaves(1, 1, 8, 32, torch.float32, 8))
    state = MatrixMemoryState.initial(init, 1)
    cfg = _cfg("dot", "gd", "before", "online", 32)
    assert "no generated source" in kernels.why_not(cfg, q, retain, state)
    o, _ = kernels.triton_chunked(q, k, v, lr, retain, state, cfg)
    assert torch.equal(o, chunked(q, k, v, lr, retain, state, cfg)[0])


def test_custom_op_registrations():
    """torch.library's own checks of each op's schema, fake (meta) kernel and autograd registration."""
    from nestc_runtime.kernels.matrix_ops import matrix_memory_forward, matrix_momentum_forward
    from nestc_runtime.kernels.mlp_ops import mlp_memory_forward

    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    q, k, v, lr, retain, beta, init = (x.detach().float() for x in _leaves(1, 1, 16, 16, torch.float32, 5))
    key = kernels.kernel_key(_cfg("l2", "gd", "before", "online", 16), 16, 16, torch.float32).text()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, lr, retain.log(), init[None])]
    torch.library.opcheck(matrix_memory_forward, (key, *leaves), test_utils=checks)
    key = kernels.kernel_key(_cfg("l2", "momentum_gd", "after", "online", 16), 16, 16, torch.float32).text()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, lr, retain.log(), beta.log(), init[None], init[None])]
    torch.library.opcheck(
        matrix_momentum_forward, (key, *leaves, torch.tensor([16], dtype=torch.int32)), test_utils=checks
    )
    key = "mlp-l2-gd-online-c16-d16-h32-ln-fp32"
    w1, w2 = torch.randn(1, 1, 16, 32) / 6, torch.randn(1, 1, 32, 16) / 4
    leaves = [x.clone().requires_grad_() for x in (q, k, v, lr, retain.log(), w1, w2)]
    torch.library.opcheck(mlp_memory_forward, (key, *leaves), test_utils=checks)


def test_torch_compile_traces_through_the_kernel():
    """A compiled function with the kernel inside (fullgraph: no graph break), forward and backward."""
    cfg = _cfg("dot", "gd", "after", "online", 16)
    leaves = [x.detach().float().requires_grad_() for x in _leaves(1, 2, 20, 16, torch.float32, 6)]
    del leaves[5]  # no momentum rate

    def loss(q, k, v, lr, retain, init):
        o, state = kernels.triton_chunked(q, k, v, lr, retain, MatrixMemoryState.initial(init, 1), cfg)
        return o.square().sum() + state.S.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want):
        assert _rel(a, b) <= F32_TOL


def test_model_backend_triton_equals_chunked():
    """A whole Gated DeltaNet model: the triton backend's logits and gradients equal the chunked backend's."""
    import nestc

    model = nestc.compile("specs/gated_deltanet.nest", backend="triton", d=32, heads=2, layers=1)
    assert model.backend == "triton"
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    logits = model(tokens)
    grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
    model.backend = "chunked"
    logits_ref = model(tokens)
    grads_ref = torch.autograd.grad(logits_ref.square().mean(), list(model.parameters()))
    assert _rel(logits, logits_ref) <= F32_TOL
    for a, b in zip(grads, grads_ref):
        assert _rel(a, b) <= 1e-4


def test_backend_triton_without_gpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    from nestc_runtime.errors import RuntimeInputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeInputError, match="needs a CUDA GPU"):
        kernels.resolve_backend("triton")
    assert kernels.resolve_backend("auto") == "chunked"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_backend("triton") == "triton"


def test_a_stale_cached_kernel_is_regenerated(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """The digest names the key, not the compiler version: with the compiler installed, its source wins."""
    from nestc.codegen import source_for
    from nestc_runtime.kernels.key import parse_key

    monkeypatch.setenv("NESTC_KERNEL_CACHE", str(tmp_path))
    key = parse_key("matrix-dot-gd-after-online-c16-bt16-dk16-dv16-fp32")
    (tmp_path / f"{key.digest()}.py").write_text('KEY = "an older kernel"\n')
    assert source._generate(key).read_text() == source_for(key.text())


# ---- the 2-layer MLP memory: generated per-chunk forward and update, and backward


def _mlp_compare(objective: str, read: str, chunk: int, norm: bool, steps: int, dtype=torch.float32, lengths=None):
    from nestc_runtime.ops.mlp_memory import MLPMemoryConfig, MLPMemoryState
    from nestc_runtime.ops.mlp_memory import scan as mlp_scan
    from nestc_runtime.ops.mlp_memory import triton as mlp_kernels

    cfg = MLPMemoryConfig(objective=objective, chunk=chunk, read=read, norm=norm)
    batch, heads, d, hidden = (1 if lengths is None else len(lengths)), 2, 16, 32
    g = torch.Generator().manual_seed(11)
    leaves = _leaves(batch, heads, steps, d, dtype, 11)[:5]
    inits = [torch.randn(heads, d, hidden, generator=g) / hidden**0.5, torch.randn(heads, hidden, d, generator=g) / 4]
    leaves += [x.to(dtype).double().requires_grad_() for x in inits]

    def run(op, dt):
        q, k, v, lr, retain, w1, w2 = (x.to(dt) for x in leaves)
        state = MLPMemoryState.initial(w1, w2, batch)
        if op is mlp_kernels.triton_chunked:
            assert mlp_kernels.why_not(cfg, q, retain, state) is None
        o, after = op(q, k, v, lr, retain, state, cfg, lengths=lengths)
        weights = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o)
        loss = (o.double() * weights).sum() + after.W1.double().square().sum() + after.W2.double().square().sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        return o, after, grads

    o_ref, s_ref, g_ref = run(mlp_scan, torch.float64)
    o, s, grads = run(mlp_kernels.triton_chunked, dtype)
    out_tol, grad_tol = (F32_TOL, F32_TOL) if dtype == torch.float32 else (BF16_OUT_TOL, BF16_GRAD_TOL)
    assert _rel(o, o_ref) <= out_tol
    for got, want in ((s.W1, s_ref.W1), (s.W2, s_ref.W2), (s.P1, s_ref.P1), (s.P2, s_ref.P2)):
        assert _rel(got, want) <= out_tol
    assert torch.equal(s.phase, s_ref.phase) and torch.equal(s.chunks_done, s_ref.chunks_done)
    for name, got, want in zip(("q", "k", "v", "lr", "retain", "W1", "W2"), grads, g_ref):
        assert _rel(got, want) <= grad_tol, name


@pytest.mark.parametrize(
    ("objective", "read", "chunk", "norm", "steps"),
    [
        ("l2", "online", 16, True, 33),  # x + LN(W1 silu(W2 x)), the Titans form (here with gd)
        ("l2", "before", 16, False, 31),  # x + W1 silu(W2 x), the self-modifying Titans form
        ("dot", "boundary", 16, True, 17),
        ("l2", "online", 32, False, 47),
    ],
)
def test_mlp_kernels_equal_reference_fp32(objective: str, read: str, chunk: int, norm: bool, steps: int):
    _mlp_compare(objective, read, chunk, norm, steps)


def test_mlp_kernel_bf16_and_variable_length():
    _mlp_compare("l2", "online", 16, True, 33, dtype=torch.bfloat16)
    _mlp_compare("l2", "online", 16, False, 40, lengths=torch.tensor([40, 21]))

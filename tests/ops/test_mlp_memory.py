"""Tests of the MLP-memory level: reference against the equations, chunked == reference, streaming, padding.

Expectations are built here in plain torch (the per-token gradients by autograd of ℓ), importing
nothing of the runtime to compute them.
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor

from nestc_runtime.ops.mlp_memory import MLPMemoryConfig, MLPMemoryState, chunked, has_parallel_form, scan

F64 = torch.float64
B, H, D, HID = 2, 2, 4, 8


def make(steps: int, seed: int, per_channel: bool = False, batch: int = B) -> dict[str, Tensor]:
    """Leaf inputs: q, k, v; η ∈ (0, 0.2); α ∈ (0.8, 1); β ∈ (0, 0.9); init W1 (H,d,h), W2 (H,h,d)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    alpha_shape = (batch, H, steps, D) if per_channel else (batch, H, steps)
    xs = {
        "q": rand(batch, H, steps, D),
        "k": 0.7 * rand(batch, H, steps, D),
        "v": rand(batch, H, steps, D),
        "lr": 0.2 * torch.sigmoid(rand(batch, H, steps)),
        "retain": 0.8 + 0.2 * torch.sigmoid(rand(*alpha_shape) + 1.0),
        "beta": 0.9 * torch.sigmoid(rand(batch, H, steps)),
        "init1": 0.4 * rand(H, D, HID),
        "init2": 0.4 * rand(H, HID, D),
    }
    return {name: x.requires_grad_() for name, x in xs.items()}


def call(fn, xs: dict[str, Tensor], cfg: MLPMemoryConfig, state: MLPMemoryState | None = None, **kw):  # type: ignore[no-untyped-def]
    if state is None:
        state = MLPMemoryState.initial(xs["init1"], xs["init2"], xs["q"].shape[0])
    beta = xs["beta"] if cfg.optimizer == "momentum_gd" else None
    return fn(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg, momentum=beta, **kw)


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    assert a.shape == b.shape
    if b.numel() == 0:
        return
    scale = b.pow(2).mean().sqrt().clamp_min(1e-12)
    err = ((a - b).pow(2).mean().sqrt() / scale).item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------- the equations, in plain torch


ACTIVATION = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu}


def memory(W1: Tensor, W2: Tensor, x: Tensor, norm: bool, activation: str = "silu") -> Tensor:
    """x + W1 σ(W2 x) (or x + LN(·)), one vector x (d,); σ from torch.nn.functional by name."""
    y = W1 @ ACTIVATION[activation](W2 @ x)
    if norm:
        y = torch.nn.functional.layer_norm(y, (x.shape[0],), eps=1e-5)
    return x + y


def grads_at(
    W1: Tensor, W2: Tensor, k: Tensor, v: Tensor, objective: str, norm: bool, activation: str = "silu"
) -> tuple[Tensor, Tensor]:
    """∂ℓ/∂W1, ∂ℓ/∂W2 by autograd, ℓ = ½‖M(k) - v‖² or -⟨M(k), v⟩."""
    A, Bm = W1.detach().requires_grad_(), W2.detach().requires_grad_()
    out = memory(A, Bm, k, norm, activation)
    loss = 0.5 * (out - v).pow(2).sum() if objective == "l2" else -(out * v).sum()
    g1, g2 = torch.autograd.grad(loss, (A, Bm))
    return g1, g2


def by_hand(xs: dict[str, Tensor], cfg: MLPMemoryConfig) -> tuple[Tensor, Tensor, Tensor]:
    """DESIGN §5 for one (row, head) at a time: g_t at the chunk-start θ, then the optimizer."""
    q, k, v, lr, retain, beta, init1, init2 = (
        xs[n].detach() for n in ("q", "k", "v", "lr", "retain", "beta", "init1", "init2")
    )
    steps = q.shape[2]
    out = torch.zeros_like(q)
    W1_end, W2_end = torch.zeros(B, H, D, HID, dtype=F64), torch.zeros(B, H, HID, D, dtype=F64)
    for b, h in itertools.product(range(B), range(H)):
        W1, W2 = init1[h].clone(), init2[h].clone()
        M1, M2 = torch.zeros_like(W1), torch.zeros_like(W2)
        P1, P2 = W1, W2
        for t in range(steps):
            if t % cfg.chunk == 0:
                P1, P2 = W1, W2
            a = retain[b, h, t]
            A_out = torch.diag(a) if a.dim() == 1 else a * torch.eye(D, dtype=F64)  # diag(α), or α I
            eta = lr[b, h, t]
            g1, g2 = grads_at(P1, P2, k[b, h, t], v[b, h, t], cfg.objective, cfg.norm, cfg.activation)
            before = (W1, W2)
            if cfg.optimizer == "gd":
                W1, W2 = A_out @ W1 - eta * g1, W2 @ A_out - eta * g2
            elif cfg.optimizer == "momentum_gd":
                M1, M2 = beta[b, h, t] * M1 - eta * g1, beta[b, h, t] * M2 - eta * g2
                W1, W2 = A_out @ W1 + M1, W2 @ A_out + M2
            else:
                kh = k[b, h, t] / k[b, h, t].norm()
                W2 = W2 @ (A_out - eta * torch.outer(kh, kh)) - eta * g2
                if cfg.dgd_both:  # the factor on W1 as well, with its normalised input σ(W2 k) at the chunk start
                    sh = ACTIVATION[cfg.activation](P2 @ k[b, h, t])
                    sh = sh / sh.norm().clamp_min(1e-12)  # as F.normalize: a zero σ (ReLU) stays zero
                    W1 = A_out @ W1 - eta * torch.outer(W1 @ sh, sh) - eta * g1
                else:
                    W1 = A_out @ W1 - eta * g1
            read = {"online": (W1, W2), "before": before, "boundary": (P1, P2)}[cfg.read]
            out[b, h, t] = memory(*read, q[b, h, t], cfg.norm, cfg.activation)
        W1_end[b, h], W2_end[b, h] = W1, W2
    return out, W1_end, W2_end


@pytest.mark.parametrize(
    "optimizer,objective,norm,chunk,read,per_channel",
    [
        ("gd", "l2", False, 1, "online", False),
        ("gd", "l2", True, 4, "before", False),
        ("gd", "dot", False, 4, "boundary", True),
        ("momentum_gd", "l2", False, 4, "online", False),
        ("momentum_gd", "l2", True, 1, "online", True),
        ("dgd", "l2", False, 1, "online", False),
        ("dgd", "dot", True, 4, "before", True),
        ("dgd both", "l2", False, 1, "online", False),
        ("dgd both", "l2", True, 4, "online", True),
        ("dgd both", "dot", False, 4, "before", False),
    ],
)
def test_reference_matches_equations(
    optimizer: str, objective: str, norm: bool, chunk: int, read: str, per_channel: bool
) -> None:
    both = optimizer == "dgd both"
    cfg = MLPMemoryConfig(objective, chunk, read, optimizer=optimizer.split()[0], norm=norm, dgd_both=both)
    xs = make(9, seed=chunk, per_channel=per_channel)
    o, state = call(scan, xs, cfg)
    o_ref, W1, W2 = by_hand(xs, cfg)
    assert_close(o, o_ref, 1e-11)
    assert_close(state.W1, W1, 1e-11)
    assert_close(state.W2, W2, 1e-11)


# ---------------------------------------------------------------- chunked == reference


def _loss(o: Tensor, s: MLPMemoryState) -> Tensor:
    gen = torch.Generator().manual_seed(9)
    total = o.new_zeros(())
    for x in (o, s.W1, s.W2, s.P1, s.P2, s.M1, s.M2):
        total = total + (x * torch.randn(x.shape, generator=gen, dtype=F64)).sum()
    return total


def _check_states(s: MLPMemoryState, s_ref: MLPMemoryState) -> None:
    for a, b in zip(s.tensors(), s_ref.tensors()):
        assert_close(a, b)
    assert torch.equal(s.phase, s_ref.phase)
    assert torch.equal(s.chunks_done, s_ref.chunks_done)


def _check(xs: dict[str, Tensor], cfg: MLPMemoryConfig, **kw: object) -> None:
    o_ref, s_ref = call(scan, xs, cfg, **kw)
    o, s = call(chunked, xs, cfg, **kw)
    assert_close(o, o_ref)
    _check_states(s, s_ref)
    g_ref = torch.autograd.grad(_loss(o_ref, s_ref), list(xs.values()), allow_unused=True)
    g = torch.autograd.grad(_loss(o, s), list(xs.values()), allow_unused=True)
    for name, a, b in zip(xs, g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None and b is not None:
            try:
                assert_close(a, b)
            except AssertionError as exc:
                raise AssertionError(f"grad {name}, {cfg}: {exc}") from None


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("optimizer", ["gd", "momentum_gd", "dgd both"])
def test_other_activations_match_equations(activation: str, optimizer: str) -> None:
    """σ = GELU (erf form) or ReLU: the reference against the written-out equations, and chunked against the
    reference (its hand-written σ' included) at chunks 1 and 4."""
    both = optimizer == "dgd both"
    cfg = MLPMemoryConfig("l2", 4, "online", optimizer=optimizer.split()[0], dgd_both=both, activation=activation)
    xs = make(9, seed=5)
    o, state = call(scan, xs, cfg)
    o_ref, W1, W2 = by_hand(xs, cfg)
    assert_close(o, o_ref, 1e-11)
    assert_close(state.W1, W1, 1e-11)
    assert_close(state.W2, W2, 1e-11)
    for chunk in (1, 4):
        _check(make(13, seed=chunk), replace(cfg, chunk=chunk))


@pytest.mark.parametrize("optimizer", ["gd", "momentum_gd", "dgd"])
@pytest.mark.parametrize("read", ["online", "before", "boundary"])
@pytest.mark.parametrize("grad", ["through", "stop", "truncate"])
def test_chunked_matches_reference(optimizer: str, read: str, grad: str) -> None:
    for chunk, norm in ((1, False), (4, False), (4, True)):
        for steps in (chunk - 1, chunk + 1, 13):
            cfg = MLPMemoryConfig("l2", chunk, read, grad, truncate_k=2, optimizer=optimizer, norm=norm)
            _check(make(steps, seed=steps + chunk), cfg)


@pytest.mark.parametrize("optimizer", ["gd", "momentum_gd"])
def test_chunked_dot_and_padding(optimizer: str) -> None:
    cfg = MLPMemoryConfig("dot", 4, "online", "through", optimizer=optimizer)
    _check(make(13, seed=3), cfg, lengths=torch.tensor([13, 6]))


def test_parallel_form_scope() -> None:
    xs, xc = make(4, 0), make(4, 0, per_channel=True)
    assert has_parallel_form(MLPMemoryConfig(chunk=4), xs["retain"], None)
    assert has_parallel_form(MLPMemoryConfig(chunk=4, optimizer="momentum_gd"), xs["retain"], xs["beta"])
    assert has_parallel_form(MLPMemoryConfig(chunk=4, optimizer="dgd"), xs["retain"], None)
    assert has_parallel_form(MLPMemoryConfig(chunk=4), xc["retain"], None)  # per-channel α: parallel too
    assert not has_parallel_form(MLPMemoryConfig(chunk=4, optimizer="newton_schulz"), xs["retain"], None)


def test_per_channel_fallback_matches() -> None:
    cfg = MLPMemoryConfig("l2", 4, "online", optimizer="gd")
    _check(make(9, seed=4, per_channel=True), cfg)


# ---------------------------------------------------------------- streaming and padding


@pytest.mark.parametrize("fn", [scan, chunked], ids=["scan", "chunked"])
@pytest.mark.parametrize(
    "optimizer,read,grad",
    [("gd", "online", "truncate"), ("momentum_gd", "boundary", "through"), ("gd", "before", "stop")],
)
def test_streaming(fn, optimizer: str, read: str, grad: str) -> None:  # type: ignore[no-untyped-def]
    cfg = MLPMemoryConfig("l2", 4, read, grad, truncate_k=2, optimizer=optimizer)
    xs = make(23, seed=5)
    o_full, s_full = call(fn, xs, cfg)
    state = None
    pieces = []
    for a, b in [(0, 3), (3, 10), (10, 23)]:
        part = {n: (x if n.startswith("init") else x[:, :, a:b]) for n, x in xs.items()}
        o, state = call(fn, part, cfg, state=state)
        pieces.append(o)
    assert state is not None
    o_stream = torch.cat(pieces, 2)
    assert_close(o_stream, o_full)
    _check_states(state, s_full)
    g_full = torch.autograd.grad(_loss(o_full, s_full), list(xs.values()), allow_unused=True)
    g_stream = torch.autograd.grad(_loss(o_stream, state), list(xs.values()), allow_unused=True)
    for a_, b_ in zip(g_stream, g_full):
        assert (a_ is None) == (b_ is None)
        if a_ is not None and b_ is not None:
            assert_close(a_, b_)


@pytest.mark.parametrize("fn", [scan, chunked], ids=["scan", "chunked"])
@pytest.mark.parametrize("grad", ["through", "truncate"])
def test_padding_and_phases(fn, grad: str) -> None:  # type: ignore[no-untyped-def]
    """Rows with different phases (3, 2) and lengths (13, 7) behave as if alone; padding outputs 0."""
    cfg = MLPMemoryConfig("l2", 4, "online", grad, truncate_k=2, optimizer="momentum_gd")
    starts = []
    for row, prefix in enumerate([3, 6]):
        _, s = call(chunked, make(prefix, seed=20 + row, batch=1), cfg)
        starts.append(s.detach())
    xs = make(13, seed=30)
    lengths = [13, 7]
    o, s = call(fn, xs, cfg, state=MLPMemoryState.cat(starts), lengths=torch.tensor(lengths))
    for row, n in enumerate(lengths):
        part = {name: (x if name.startswith("init") else x[row : row + 1, :, :n]) for name, x in xs.items()}
        o_row, s_row = call(fn, part, cfg, state=starts[row])
        assert_close(o[row : row + 1, :, :n], o_row)
        _check_states(s.select(row), s_row)
        assert torch.all(o[row, :, n:] == 0)


def test_gradient_reaches_init() -> None:
    """The initial state is a meta-learned parameter: every mode passes it gradient."""
    for grad in ("through", "stop", "truncate"):
        xs = make(9, seed=1)
        o, _ = call(chunked, xs, MLPMemoryConfig("l2", 4, "online", grad))
        g1, g2 = torch.autograd.grad(o.sum(), (xs["init1"], xs["init2"]))
        assert g1.abs().sum() > 0 and g2.abs().sum() > 0


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        MLPMemoryConfig(objective="l3")
    with pytest.raises(ValueError):
        MLPMemoryConfig(chunk=0)
    with pytest.raises(ValueError):
        MLPMemoryConfig(optimizer="adam")


@pytest.mark.parametrize("optimizer", ["gd", "momentum_gd", "dgd"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_chunked_strong_decay(monkeypatch: pytest.MonkeyPatch, optimizer: str, per_channel: bool) -> None:
    """Ordinary chunks take Γ_n · (1/Γ_{r+1}); a chunk that decays past the float range (α = 1e-3 for 111
    tokens: log Γ ≈ -767 < -697 in float64) takes the exact ratios exp(log Γ_n - log Γ_{r+1})."""
    module = importlib.import_module("nestc_runtime.ops.mlp_memory.chunked")
    real = module._factorable
    taken: list[bool] = []

    def spy(log_gamma: Tensor) -> bool:
        taken.append(real(log_gamma))
        return taken[-1]

    monkeypatch.setattr(module, "_factorable", spy)
    cfg = MLPMemoryConfig("l2", 128, "online", optimizer=optimizer, norm=True)
    xs = make(133, seed=11, per_channel=per_channel)
    _check(xs, cfg)
    assert taken and all(taken)
    taken.clear()
    with torch.no_grad():
        xs["retain"][:, :, 10:121] = 1e-3
    _check(xs, cfg)
    assert False in taken


@pytest.mark.parametrize("read", ["online", "before", "boundary"])
@pytest.mark.parametrize("grad", ["through", "stop", "truncate"])
def test_chunked_dgd_both_matches_reference(read: str, grad: str) -> None:
    """dgd(both): W1's factor has its key σ(W2 k) from the chunk start, so its UT system is solved per block."""
    for chunk, per_channel, norm in ((1, False, False), (4, False, True), (4, True, False), (16, True, True)):
        for steps in (chunk + 1, 13):
            cfg = MLPMemoryConfig("l2", chunk, read, grad, truncate_k=2, optimizer="dgd", norm=norm, dgd_both=True)
            xs = make(steps, seed=steps + chunk, per_channel=per_channel)
            _check(xs, cfg, lengths=torch.tensor([steps, max(steps - 3, 1)]))
    with pytest.raises(ValueError):
        MLPMemoryConfig(optimizer="gd", dgd_both=True)


DGD_BOTH_SPEC = """
system case(d = 8, heads = 2, vocab = 257) {
  level pretrain { update every step; optimizer adamw(lr = 1e-3) }
  level memory in pretrain {
    memory    mlp(depth = 2, expand = 2, residual) per head
    queries   linear(x) |> l2norm
    keys      linear(x) |> l2norm
    values    linear(x)
    objective l2(memory(keys), values)
    optimizer dgd(both, lr = sigmoid(linear(x)) * 0.5, retain = sigmoid(linear(x) + 2))
    update every 4 tokens; read online; outer gradient through
  }
  model = embed -> residual(rmsnorm -> memory -> linear) -> head
}
"""


def test_dgd_both_compiles_and_runs(tmp_path: Path) -> None:
    """`dgd(both)` lowers (no E040) to an MLP level with the factor on both maps; chunked == reference."""
    import nestc

    spec = tmp_path / "case.nest"
    spec.write_text(DGD_BOTH_SPEC)
    torch.manual_seed(0)
    model = nestc.compile(spec).double()
    assert model.levels["memory"].config.dgd_both
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, 11, 257, dtype=F64, generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("chunked", "reference"):
        model.backend = backend
        logits = model(tokens)
        grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()), allow_unused=True)
        results[backend] = (logits.detach(), grads)
    assert_close(results["chunked"][0], results["reference"][0])
    for a, b in zip(results["chunked"][1], results["reference"][1]):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert_close(a, b)


def test_compile_failure_falls_back_to_the_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """With compiling asked for but failing at the first call (no compiler), the eager step runs instead."""
    module = importlib.import_module("nestc_runtime.ops.mlp_memory.chunked")
    calls: list[int] = []

    def broken_compile(fn, **kwargs):  # type: ignore[no-untyped-def]
        def compiled(*args: object) -> None:
            calls.append(1)
            raise RuntimeError("no C++ compiler")

        return compiled

    monkeypatch.setattr(module.torch, "compile", broken_compile)
    monkeypatch.setattr(module, "_COMPILED", {})
    monkeypatch.setitem(module._COMPILE, "on", True)
    _check(make(13, seed=2, per_channel=True), MLPMemoryConfig("l2", 4, "online", optimizer="momentum_gd", norm=True))
    assert calls == [1]  # tried once, then eager for good

"""The parallel forms added for per-channel retention and dgd: chunked == reference, and taken.

Each check runs the per-token reference (the oracle) and the chunked fast path on the same leaves
and compares outputs, every carried state and the gradients of every input and initial state, in
float64 (relative RMS error ≤ 1e-10); an fp32 check at T = 256 holds them to DESIGN §3's 1e-5.
``_scan_fallback`` is patched to raise, so a combination that silently fell back would fail.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from nestc_runtime.ops import matrix_memory as mat
from nestc_runtime.ops import mlp_memory as mlp

# The modules themselves (the packages re-export a function named ``chunked``).
mlp_chunked = importlib.import_module("nestc_runtime.ops.mlp_memory.chunked")
matrix_chunked = importlib.import_module("nestc_runtime.ops.matrix_memory.chunked")

F64 = torch.float64
B, H, D, HID = 2, 2, 4, 8
CHUNKS = (1, 4, 16)
MLP_CHUNKS = (2, 4, 16)  # an MLP memory updated every token runs the compiled scan (test_compiled_scan_mlp.py)


@pytest.fixture(autouse=True)
def _no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scan fallback was taken")

    monkeypatch.setattr(mlp_chunked, "_scan_fallback", refuse)
    monkeypatch.setattr(matrix_chunked, "_scan_fallback", refuse)


def _rel(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    if b.numel() == 0:
        return 0.0
    scale = b.double().pow(2).mean().sqrt().clamp_min(1e-12)
    return ((a.double() - b.double()).pow(2).mean().sqrt() / scale).item()


def _loss(outputs: list[Tensor]) -> Tensor:
    gen = torch.Generator().manual_seed(9)
    total = outputs[0].new_zeros(())
    for x in outputs:
        total = total + (x * torch.randn(x.shape, generator=gen, dtype=F64).to(x.dtype)).sum()
    return total


def _compare(
    run: Callable[[str], tuple[Tensor, list[Tensor]]], leaves: dict[str, Tensor], names: tuple[str, ...], tol: float
) -> None:
    """run(fn) -> (o, [states]) for fn in (reference scan, chunked); compare values and gradients."""
    (o_ref, s_ref), (o, s) = run("scan"), run("chunked")
    assert _rel(o, o_ref) <= tol, f"output {_rel(o, o_ref):.2e}"
    for name, a, b in zip(names, s, s_ref):
        assert _rel(a, b) <= tol, f"state {name} {_rel(a, b):.2e}"
    wrt = [x for x in leaves.values() if x.requires_grad]
    g_ref = torch.autograd.grad(_loss([o_ref, *s_ref]), wrt, allow_unused=True)
    g = torch.autograd.grad(_loss([o, *s]), wrt, allow_unused=True)
    for name, a, b in zip([n for n, x in leaves.items() if x.requires_grad], g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None and b is not None:
            assert _rel(a, b) <= tol, f"grad {name} {_rel(a, b):.2e}"


# ---------------------------------------------------------------- MLP memory


def _mlp_leaves(steps: int, seed: int, channel_beta: bool, dtype: torch.dtype = F64) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    xs = {
        "q": rand(B, H, steps, D),
        "k": 0.7 * rand(B, H, steps, D),
        "v": rand(B, H, steps, D),
        "lr": 0.2 * torch.sigmoid(rand(B, H, steps)),
        "retain": 0.8 + 0.2 * torch.sigmoid(rand(B, H, steps, D) + 1.0),
        "beta": 0.9 * torch.sigmoid(rand(B, H, steps, D) if channel_beta else rand(B, H, steps)),
        "init1": 0.4 * rand(H, D, HID),
        "init2": 0.4 * rand(H, HID, D),
    }
    return {n: x.to(dtype).requires_grad_() for n, x in xs.items()}


def _mlp_check(cfg: mlp.MLPMemoryConfig, xs: dict[str, Tensor], tol: float, lengths: Tensor | None = None) -> None:
    beta = xs["beta"] if cfg.optimizer == "momentum_gd" else None
    assert mlp.has_parallel_form(cfg, xs["retain"], beta)

    def run(which: str) -> tuple[Tensor, list[Tensor]]:
        fn = mlp.scan if which == "scan" else mlp.chunked
        state = mlp.MLPMemoryState.initial(xs["init1"], xs["init2"], B)
        o, s = fn(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg, lengths=lengths, momentum=beta)
        return o, list(s.tensors())

    _compare(run, xs, ("W1", "W2", "P1", "P2", "M1", "M2"), tol)


@pytest.mark.parametrize("optimizer", ["gd", "momentum_gd", "dgd"])
@pytest.mark.parametrize("chunk", MLP_CHUNKS)
@pytest.mark.parametrize("read", ["online", "before", "boundary"])
def test_mlp_per_channel_matches_reference(optimizer: str, chunk: int, read: str) -> None:
    for steps in (max(chunk - 1, 1), chunk + 1, 37):
        for grad in ("through", "stop", "truncate"):
            cfg = mlp.MLPMemoryConfig("l2", chunk, read, grad, truncate_k=2, optimizer=optimizer, norm=True)
            xs = _mlp_leaves(steps, seed=steps + chunk, channel_beta=False)
            _mlp_check(cfg, xs, 1e-10)


@pytest.mark.parametrize("objective", ["dot", "lp", "huber"])
def test_mlp_per_channel_objectives_and_padding(objective: str) -> None:
    for optimizer in ("gd", "momentum_gd", "dgd"):
        cfg = mlp.MLPMemoryConfig(objective, 4, "online", optimizer=optimizer, p=3.0, delta=0.5)
        xs = _mlp_leaves(11, seed=3, channel_beta=True)
        _mlp_check(cfg, xs, 1e-10, lengths=torch.tensor([11, 6]))


@pytest.mark.parametrize("chunk", MLP_CHUNKS)
@pytest.mark.parametrize("read", ["online", "before", "boundary"])
@pytest.mark.parametrize("grad", ["through", "stop", "truncate"])
def test_mlp_dgd_per_head_matches_reference(chunk: int, read: str, grad: str) -> None:
    for steps in (max(chunk - 1, 1), chunk + 1, 37):
        cfg = mlp.MLPMemoryConfig("l2", chunk, read, grad, truncate_k=2, optimizer="dgd")
        xs = _mlp_leaves(steps, seed=steps, channel_beta=False)
        xs["retain"] = (0.8 + 0.2 * torch.sigmoid(torch.randn(B, H, steps, dtype=F64))).requires_grad_()
        _mlp_check(cfg, xs, 1e-10, lengths=torch.tensor([steps, max(steps - 3, 0)]))


@pytest.mark.parametrize("optimizer", ["momentum_gd", "dgd"])
def test_mlp_fp32(optimizer: str) -> None:
    # norm=False: with LayerNorm over d = 4 channels this toy problem is chaotic (the fp32 *reference*
    # itself is 0.1 away from the fp64 one at T = 256), so it could not tell rounding from a bug.
    cfg = mlp.MLPMemoryConfig("l2", 16, "online", optimizer=optimizer)
    xs = _mlp_leaves(256, seed=1, channel_beta=False, dtype=torch.float32)
    _mlp_check(cfg, xs, 1e-5)


# ---------------------------------------------------------------- matrix memory

DK, DV = 5, 3


def _matrix_leaves(steps: int, seed: int, per_channel: bool, dtype: torch.dtype = F64) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    alpha = rand(B, H, steps, DK) if per_channel else rand(B, H, steps)
    xs = {
        "q": rand(B, H, steps, DK),
        "k": torch.nn.functional.normalize(rand(B, H, steps, DK), dim=-1),
        "v": rand(B, H, steps, DV),
        "lr": 0.5 * torch.sigmoid(rand(B, H, steps)),
        "retain": 0.7 + 0.3 * torch.sigmoid(alpha + 1.0),
        "init": 0.5 * rand(H, DV, DK),
    }
    return {n: x.to(dtype).requires_grad_() for n, x in xs.items()}


def _matrix_check(
    cfg: mat.MatrixMemoryConfig, xs: dict[str, Tensor], tol: float, lengths: Tensor | None = None, block: int = 64
) -> None:
    assert matrix_chunked.has_parallel_form(cfg, xs["retain"], mat.MatrixMemoryState.initial(xs["init"], B))

    def run(which: str) -> tuple[Tensor, list[Tensor]]:
        state = mat.MatrixMemoryState.initial(xs["init"], B)
        args = (xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg)
        if which == "scan":
            o, s = mat.scan(*args, lengths=lengths)
        else:
            o, s = mat.chunked(*args, lengths=lengths, block=block)
        return o, [s.S, s.P, s.log_decay]

    _compare(run, xs, ("S", "P", "log_decay"), tol)


@pytest.mark.parametrize("decay", ["after", "before"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("read", ["online", "before", "boundary"])
def test_matrix_per_channel_gd_matches_reference(decay: str, chunk: int, read: str) -> None:
    for steps in (max(chunk - 1, 1), chunk + 1, 37):
        for grad in ("through", "stop", "truncate"):
            for objective in ("l2", "dot"):
                cfg = mat.MatrixMemoryConfig(objective, decay, chunk, read, grad, truncate_k=2)
                xs = _matrix_leaves(steps, seed=steps + chunk, per_channel=True)
                _matrix_check(cfg, xs, 1e-10, lengths=torch.tensor([steps, max(steps - 3, 0)]), block=16)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("read", ["online", "before", "boundary"])
def test_matrix_dgd_matches_reference(per_channel: bool, chunk: int, read: str) -> None:
    for steps in (max(chunk - 1, 1), chunk + 1, 37):
        for grad in ("through", "stop", "truncate"):
            for objective in ("l2", "dot"):
                cfg = mat.MatrixMemoryConfig(objective, "after", chunk, read, grad, truncate_k=2, optimizer="dgd")
                xs = _matrix_leaves(steps, seed=steps + chunk, per_channel=per_channel)
                _matrix_check(cfg, xs, 1e-10, lengths=torch.tensor([steps, max(steps - 3, 0)]), block=16)


@pytest.mark.parametrize("objective", ["lp", "huber"])
def test_matrix_per_channel_nonlinear_objectives(objective: str) -> None:
    for decay in ("after", "before"):
        cfg = mat.MatrixMemoryConfig(objective, decay, 4, "online", p=3.0, delta=0.5)
        _matrix_check(cfg, _matrix_leaves(21, seed=2, per_channel=True), 1e-10, block=8)


@pytest.mark.parametrize("optimizer,per_channel", [("gd", True), ("dgd", False), ("dgd", True)])
def test_matrix_fp32(optimizer: str, per_channel: bool) -> None:
    for chunk in (1, 16):
        cfg = mat.MatrixMemoryConfig("l2", "after", chunk, "online", optimizer=optimizer)
        _matrix_check(cfg, _matrix_leaves(256, seed=1, per_channel=per_channel, dtype=torch.float32), 1e-5)


# ---------------------------------------------------------------- streaming (carried phase and decay)

PIECES = [(0, 3), (3, 10), (10, 23)]


def _piece(xs: dict[str, Tensor], a: int, b: int) -> dict[str, Tensor]:
    return {n: (x if n.startswith("init") else x[:, :, a:b]) for n, x in xs.items()}


@pytest.mark.parametrize("optimizer,read", [("momentum_gd", "online"), ("dgd", "before"), ("gd", "boundary")])
def test_mlp_streaming_per_channel(optimizer: str, read: str) -> None:
    cfg = mlp.MLPMemoryConfig("l2", 4, read, "truncate", truncate_k=2, optimizer=optimizer, norm=True)
    xs = _mlp_leaves(23, seed=5, channel_beta=False)
    beta = xs["beta"] if optimizer == "momentum_gd" else None

    def run(which: str) -> tuple[Tensor, list[Tensor]]:
        state = mlp.MLPMemoryState.initial(xs["init1"], xs["init2"], B)
        if which == "scan":
            o, s = mlp.scan(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg, momentum=beta)
            return o, list(s.tensors())
        pieces = []
        for a, b in PIECES:
            p = _piece(xs, a, b)
            mom = None if beta is None else p["beta"]
            o, state = mlp.chunked(p["q"], p["k"], p["v"], p["lr"], p["retain"], state, cfg, momentum=mom)
            pieces.append(o)
        return torch.cat(pieces, 2), list(state.tensors())

    _compare(run, xs, ("W1", "W2", "P1", "P2", "M1", "M2"), 1e-10)


@pytest.mark.parametrize(
    "optimizer,decay,per_channel", [("gd", "before", True), ("dgd", "after", True), ("dgd", "after", False)]
)
def test_matrix_streaming(optimizer: str, decay: str, per_channel: bool) -> None:
    cfg = mat.MatrixMemoryConfig("l2", decay, 4, "online", "truncate", truncate_k=2, optimizer=optimizer)
    xs = _matrix_leaves(23, seed=5, per_channel=per_channel)

    def run(which: str) -> tuple[Tensor, list[Tensor]]:
        state = mat.MatrixMemoryState.initial(xs["init"], B)
        if which == "scan":
            o, s = mat.scan(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg)
            return o, [s.S, s.P, s.log_decay]
        pieces = []
        for a, b in PIECES:
            p = _piece(xs, a, b)
            o, state = mat.chunked(p["q"], p["k"], p["v"], p["lr"], p["retain"], state, cfg, block=5)
            pieces.append(o)
        return torch.cat(pieces, 2), [state.S, state.P, state.log_decay]

    _compare(run, xs, ("S", "P", "log_decay"), 1e-10)

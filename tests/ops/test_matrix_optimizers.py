"""Matrix memory: momentum_gd, dgd, per-channel retention, and the Newton–Schulz output map.

Every expectation is built here in plain torch from the equations of DESIGN §5 (nothing of the
runtime is used to compute it); chunked is then held to the reference.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch import Tensor

from nestc_runtime.ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState, chunked, scan
from nestc_runtime.ops.matrix_memory.chunked import has_parallel_form
from nestc_runtime.ops.matrix_memory.momentum import has_momentum_form
from nestc_runtime.ops.newton_schulz import newton_schulz

F64 = torch.float64
B, H, DK, DV = 2, 2, 5, 4


def make(steps: int, seed: int, per_channel: bool = False) -> dict[str, Tensor]:
    """Leaf inputs: q, k (l2-normalised), v, η ∈ (0, 0.5), α ∈ (0.5, 1), β ∈ (0, 0.9), init."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    alpha_shape = (B, H, steps, DK) if per_channel else (B, H, steps)
    xs = {
        "q": rand(B, H, steps, DK),
        "k": torch.nn.functional.normalize(rand(B, H, steps, DK), dim=-1),
        "v": rand(B, H, steps, DV),
        "lr": 0.5 * torch.sigmoid(rand(B, H, steps)),
        "retain": 0.5 + 0.5 * torch.sigmoid(rand(*alpha_shape) + 1.0),
        "beta": 0.9 * torch.sigmoid(rand(B, H, steps)),
        "init": 0.3 * rand(H, DV, DK),
    }
    return {name: x.requires_grad_() for name, x in xs.items()}


def call(fn, xs: dict[str, Tensor], cfg: MatrixMemoryConfig, state: MatrixMemoryState | None = None, **kw):  # type: ignore[no-untyped-def]
    if state is None:
        state = MatrixMemoryState.initial(xs["init"], xs["q"].shape[0])
    beta = xs["beta"] if cfg.optimizer == "momentum_gd" else None
    return fn(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg, momentum=beta, **kw)


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    scale = b.pow(2).mean().sqrt().clamp_min(1e-12)
    err = ((a - b).pow(2).mean().sqrt() / scale).item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def diag_keys(S: Tensor, a: Tensor) -> Tensor:
    """S·diag(a) with a (B,H) (scalar) or (B,H,dk)."""
    return S * (a[..., None, None] if a.dim() == 2 else a[..., None, :])


def by_hand(xs: dict[str, Tensor], objective: str, decay: str, chunk: int, optimizer: str) -> tuple[Tensor, Tensor]:
    """DESIGN §5 written out: g_t at the chunk-start state (decayed for "before"), then the optimizer."""
    q, k, v, lr, retain, beta, init = (xs[n].detach() for n in ("q", "k", "v", "lr", "retain", "beta", "init"))
    steps = q.shape[2]
    S = init.expand(B, H, DV, DK).clone()
    m = torch.zeros_like(S)
    eye = torch.eye(DK, dtype=F64)
    outs = []
    for b in range(0, steps, chunk):
        base = S
        gamma = torch.ones_like(retain[:, :, 0])
        for t in range(b, min(b + chunk, steps)):
            kt, a, eta = k[:, :, t], retain[:, :, t], lr[:, :, t, None, None]
            gamma = gamma * a
            lin = base if decay == "after" else diag_keys(base, gamma)
            if objective == "l2":
                g = (lin @ kt[..., None] - v[:, :, t, :, None]) @ kt[..., None, :]
            else:
                g = -v[:, :, t, :, None] @ kt[..., None, :]
            if optimizer == "gd":
                S = diag_keys(S, a) - eta * g
            elif optimizer == "momentum_gd":
                m = beta[:, :, t, None, None] * m - eta * g
                S = diag_keys(S, a) + m
            else:
                alpha_eye = torch.diag_embed(a) if a.dim() == 3 else a[..., None, None] * eye
                S = S @ (alpha_eye - eta * kt[..., :, None] * kt[..., None, :]) - eta * g
            outs.append((S @ q[:, :, t, :, None])[..., 0])
    return torch.stack(outs, 2), S


# ---------------------------------------------------------------- reference against the equations


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize(
    "optimizer,objective,decay",
    [
        ("momentum_gd", "l2", "after"),
        ("momentum_gd", "l2", "before"),
        ("momentum_gd", "dot", "after"),
        ("dgd", "l2", "after"),
        ("dgd", "dot", "after"),
        ("gd", "l2", "before"),
        ("gd", "l2", "after"),
    ],
)
def test_reference_matches_equations(optimizer: str, objective: str, decay: str, chunk: int, per_channel: bool) -> None:
    xs = make(14, seed=chunk + 10 * per_channel, per_channel=per_channel)
    cfg = MatrixMemoryConfig(objective, decay, chunk, "online", optimizer=optimizer)
    o, state = call(scan, xs, cfg)
    o_ref, S_ref = by_hand(xs, objective, decay, chunk, optimizer)
    assert_close(o, o_ref, 1e-12)
    assert_close(state.S, S_ref, 1e-12)


@pytest.mark.parametrize("objective,twice", [("l2", 2.0), ("dot", 1.0)])
def test_dgd_closed_form_c1(objective: str, twice: float) -> None:
    """C = 1: l2 erases the key direction twice, M(αI - 2η k kᵀ) + η v kᵀ; dot once, M(αI - η k kᵀ) + η v kᵀ."""
    xs = make(17, seed=3)
    cfg = MatrixMemoryConfig(objective, "after", 1, "before", optimizer="dgd")
    o, state = call(scan, xs, cfg)
    q, k, v, lr, retain, init = (xs[n].detach() for n in ("q", "k", "v", "lr", "retain", "init"))
    M = init.expand(B, H, DV, DK).clone()
    eye = torch.eye(DK, dtype=F64)
    outs = []
    for t in range(17):
        kt, a, eta = k[:, :, t], retain[:, :, t, None, None], lr[:, :, t, None, None]
        outs.append(torch.einsum("bhvk,bhk->bhv", M, q[:, :, t]))  # read "before"
        M = (
            M @ (a * eye - twice * eta * kt[..., :, None] * kt[..., None, :])
            + eta * v[:, :, t, :, None] * kt[..., None, :]
        )
    assert_close(o, torch.stack(outs, 2), 1e-12)
    assert_close(state.S, M, 1e-12)


def test_dgd_decay_before_is_an_error() -> None:
    with pytest.raises(ValueError):
        MatrixMemoryConfig("l2", "before", 1, "online", optimizer="dgd")
    with pytest.raises(ValueError):
        MatrixMemoryConfig("l2", "after", 1, "online", optimizer="adam")


def test_momentum_needs_beta() -> None:
    xs = make(3, seed=0)
    cfg = MatrixMemoryConfig("l2", "after", 1, "online", optimizer="momentum_gd")
    state = MatrixMemoryState.initial(xs["init"], B)
    with pytest.raises(ValueError):
        scan(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg)


# ---------------------------------------------------------------- chunked == reference


def _loss(o: Tensor, s: MatrixMemoryState) -> Tensor:
    gen = torch.Generator().manual_seed(9)
    return sum(
        (x * torch.randn(x.shape, generator=gen, dtype=F64)).sum() for x in (o, s.S, s.P, s.log_decay, s.momentum)
    )  # type: ignore[return-value]


def _check(xs: dict[str, Tensor], cfg: MatrixMemoryConfig, lengths: Tensor | None = None) -> None:
    o_ref, s_ref = call(scan, xs, cfg, lengths=lengths)
    o, s = call(chunked, xs, cfg, lengths=lengths)
    assert_close(o, o_ref)
    for a, b in ((s.S, s_ref.S), (s.P, s_ref.P), (s.log_decay, s_ref.log_decay), (s.momentum, s_ref.momentum)):
        assert_close(a, b)
    names = list(xs)
    g_ref = torch.autograd.grad(_loss(o_ref, s_ref), list(xs.values()), allow_unused=True)
    g = torch.autograd.grad(_loss(o, s), list(xs.values()), allow_unused=True)
    for name, a, b in zip(names, g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None and b is not None:
            assert_close(a, b)


@pytest.mark.parametrize("grad", ["through", "stop", "truncate"])
@pytest.mark.parametrize("optimizer", ["momentum_gd", "dgd", "gd"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_matches_reference(chunk: int, optimizer: str, grad: str) -> None:
    for steps in (chunk - 1, chunk + 1, 13):
        for per_channel in (False, True):
            xs = make(max(steps, 1), seed=steps + 7 * per_channel, per_channel=per_channel)
            cfg = MatrixMemoryConfig("l2", "after", chunk, "online", grad, truncate_k=2, optimizer=optimizer)
            _check(xs, cfg, lengths=torch.tensor([max(steps, 1), max(steps - 2, 0)]))


def test_parallel_form_scope() -> None:
    xs, xc = make(4, 0), make(4, 0, per_channel=True)
    state = MatrixMemoryState.initial(xs["init"], B)
    assert has_parallel_form(MatrixMemoryConfig("l2", "after", 4, "online"), xs["retain"], state)
    assert has_parallel_form(MatrixMemoryConfig("l2", "after", 4, "online"), xc["retain"], state)
    assert has_parallel_form(MatrixMemoryConfig("l2", "after", 4, "online", optimizer="dgd"), xs["retain"], state)
    assert not has_parallel_form(
        MatrixMemoryConfig("l2", "after", 4, "online", optimizer="momentum_gd"), xs["retain"], state
    )


@pytest.mark.parametrize("fn", [scan, chunked], ids=["scan", "chunked"])
@pytest.mark.parametrize("optimizer,decay", [("momentum_gd", "before"), ("dgd", "after")])
def test_streaming_carries_momentum(fn, optimizer: str, decay: str) -> None:  # type: ignore[no-untyped-def]
    cfg = MatrixMemoryConfig("l2", decay, 4, "boundary", "truncate", truncate_k=2, optimizer=optimizer)
    xs = make(23, seed=5, per_channel=True)
    o_full, s_full = call(fn, xs, cfg)
    state = MatrixMemoryState.initial(xs["init"], B)
    pieces = []
    for a, b in [(0, 3), (3, 10), (10, 23)]:
        part = {n: (x if n == "init" else x[:, :, a:b]) for n, x in xs.items()}
        o, state = call(fn, part, cfg, state=state)
        pieces.append(o)
    assert_close(torch.cat(pieces, 2), o_full)
    assert_close(state.S, s_full.S)
    assert_close(state.momentum, s_full.momentum)
    assert_close(state.log_decay, s_full.log_decay)


# ---------------------------------------------------------------- Newton–Schulz


def _ns_by_hand(X: Tensor, steps: int) -> Tensor:
    """One matrix at a time, DESIGN §5 literally."""
    out = torch.empty_like(X)
    flat_in, flat_out = X.reshape(-1, *X.shape[-2:]), out.view(-1, *X.shape[-2:])
    for i in range(flat_in.shape[0]):
        Y = flat_in[i] / (flat_in[i].pow(2).sum().sqrt() + 1e-7)
        rows, cols = Y.shape
        if rows > cols:
            Y = Y.T
        for _ in range(steps):
            A = Y @ Y.T
            Y = 3.4445 * Y + (-4.7750) * A @ Y + 2.0315 * A @ A @ Y
        flat_out[i] = Y.T if rows > cols else Y
    return out


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 7, 4), (5, 5)])
@pytest.mark.parametrize("steps", [0, 1, 5])
def test_newton_schulz_by_hand(shape: tuple[int, ...], steps: int) -> None:
    X = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert_close(newton_schulz(X, steps), _ns_by_hand(X, steps), 1e-12)


def test_newton_schulz_orthogonalises() -> None:
    """After 5 steps the singular values sit in Muon's band around 1 (roughly 0.68 … 1.13)."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(4, 16, 8, dtype=F64, generator=gen)
    Y = newton_schulz(X, 5)
    sv = torch.linalg.svdvals(Y)
    assert sv.min() > 0.6 and sv.max() < 1.2
    assert_close(newton_schulz(X.transpose(-1, -2), 5), Y.transpose(-1, -2), 1e-12)
    assert torch.allclose(newton_schulz(torch.zeros(3, 3, dtype=F64), 3), torch.zeros(3, 3, dtype=F64))


# ---------------------------------------------------------------- momentum_gd's chunk-parallel form


@pytest.fixture
def momentum_form_taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records that the chunked calls took ``chunked_momentum`` (and refuses the scan fallback)."""
    module = importlib.import_module("nestc_runtime.ops.matrix_memory.chunked")
    taken: list[bool] = []
    real = module.chunked_momentum

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        taken.append(True)
        return real(*args, **kwargs)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scan fallback was taken")

    monkeypatch.setattr(module, "chunked_momentum", spy)
    monkeypatch.setattr(module, "_scan_fallback", refuse)
    return taken


@pytest.mark.parametrize("read", ["online", "before", "boundary"])
@pytest.mark.parametrize("objective", ["l2", "dot", "lp", "huber"])
def test_momentum_chunked_matches_reference(momentum_form_taken: list[bool], read: str, objective: str) -> None:
    for chunk, grad in ((2, "through"), (4, "stop"), (16, "truncate")):
        for steps, per_channel in ((chunk + 1, False), (37, True)):
            xs = make(steps, seed=steps + chunk, per_channel=per_channel)
            if per_channel:  # a per-channel β too
                beta = 0.9 * torch.sigmoid(torch.randn(B, H, steps, DK, generator=torch.Generator().manual_seed(3)))
                xs["beta"] = beta.to(F64).requires_grad_()
            cfg = MatrixMemoryConfig(
                objective, "after", chunk, read, grad, truncate_k=2, optimizer="momentum_gd", p=3.0, delta=0.5
            )
            _check(xs, cfg, lengths=torch.tensor([steps, max(steps - 5, 0)]))
    assert momentum_form_taken


def test_momentum_chunked_streaming_and_phases(momentum_form_taken: list[bool]) -> None:
    """Calls of 3, 7 and 13 tokens (each later call starts inside a chunk opened before it) equal one call."""
    cfg = MatrixMemoryConfig("l2", "after", 4, "online", "truncate", truncate_k=2, optimizer="momentum_gd")
    xs = make(23, seed=8, per_channel=True)
    o_full, s_full = call(scan, xs, cfg)
    state = MatrixMemoryState.initial(xs["init"], B)
    pieces = []
    for a, b in [(0, 3), (3, 10), (10, 23)]:
        part = {n: (x if n == "init" else x[:, :, a:b]) for n, x in xs.items()}
        o, state = call(chunked, part, cfg, state=state, lengths=torch.tensor([b - a, b - a]))
        pieces.append(o)
    assert_close(torch.cat(pieces, 2), o_full)
    for a_, b_ in ((state.S, s_full.S), (state.P, s_full.P), (state.momentum, s_full.momentum)):
        assert_close(a_, b_)
    assert_close(state.log_decay, s_full.log_decay)
    assert torch.equal(state.phase, s_full.phase) and torch.equal(state.chunks_done, s_full.chunks_done)
    assert len(momentum_form_taken) == 3


def test_momentum_form_scope() -> None:
    xs = make(4, 0)
    state = MatrixMemoryState.initial(xs["init"], B)

    def takes(**kw: object) -> bool:
        cfg = MatrixMemoryConfig(**{"objective": "l2", "decay": "after", "chunk": 4, "read": "online", **kw})  # type: ignore[arg-type]
        return has_momentum_form(cfg, xs["retain"], xs["beta"], state)

    assert takes(optimizer="momentum_gd")
    assert not takes(optimizer="momentum_gd", chunk=1)  # at C = 1 an l2 gradient needs the previous state
    assert not takes(optimizer="momentum_gd", decay="before")
    assert not takes(optimizer="momentum_gd", norm=True)
    assert not takes(optimizer="gd")


MOMENTUM_SPEC = """
system case(d = 8, heads = 2, vocab = 257) {{
  level pretrain {{ update every step; optimizer adamw(lr = 1e-3) }}
  level memory in pretrain {{
    memory    matrix per head
    queries   linear(x) |> l2norm
    keys      linear(x) |> l2norm
    values    linear(x)
    objective l2(memory(keys), values)
    optimizer momentum_gd(lr = 0.1, momentum = 0.9){decay}
    update every {chunk} tokens; read online; outer gradient through
  }}
  model = embed -> residual(rmsnorm -> memory -> linear) -> head
}}
"""


@pytest.mark.parametrize("chunk,decay,scan", [(16, "", False), (1, "", True), (16, "; decay before", True)])
def test_momentum_w003_names_only_the_scans(tmp_path: Path, chunk: int, decay: str, scan: bool) -> None:
    """W003 (runs as a scan) for matrix momentum_gd every token or with decay before, not every 16 tokens."""
    from nestc.pipeline import front_end

    spec = tmp_path / "case.nest"
    spec.write_text(MOMENTUM_SPEC.format(chunk=chunk, decay=decay))
    codes = {w.code for w in front_end(spec).warnings}
    assert ("W003" in codes) == scan

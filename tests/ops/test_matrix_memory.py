"""Tests of the matrix-memory level: reference semantics, block-parallel equivalence, streaming, padding."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from nestc_runtime.ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState, chunked, scan

F64 = torch.float64
B, H, DK, DV = 2, 2, 6, 5

Inputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
Run = Callable[..., tuple[Tensor, MatrixMemoryState]]


def make_inputs(batch: int, steps: int, seed: int, dtype: torch.dtype = F64) -> Inputs:
    """Leaf tensors (q, k, v, lr logits, retain logits, init); keys l2-normalised."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = rand(batch, H, steps, DK)
    k = torch.nn.functional.normalize(rand(batch, H, steps, DK), dim=-1)
    v = rand(batch, H, steps, DV)
    lr_logit = rand(batch, H, steps)
    retain_logit = rand(batch, H, steps) + 1.0
    init = 0.3 * rand(H, DV, DK)
    return tuple(x.requires_grad_() for x in (q, k, v, lr_logit, retain_logit, init))  # type: ignore[return-value]


def run(fn: Run, xs: Inputs, cfg: MatrixMemoryConfig, **kw: object) -> tuple[Tensor, MatrixMemoryState]:
    """lr = sigmoid ∈ (0,1), retain = 0.5 + 0.5 sigmoid ∈ (0.5,1), start-of-document state."""
    q, k, v, lr_logit, retain_logit, init = xs
    state = MatrixMemoryState.initial(init, q.shape[0])
    return fn(q, k, v, torch.sigmoid(lr_logit), 0.5 + 0.5 * torch.sigmoid(retain_logit), state, cfg, **kw)


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    """Relative error RMSE(a - b) / RMS(b) ≤ tol (absolute when b is all zeros)."""
    scale = b.pow(2).mean().sqrt().clamp_min(1e-12)
    err = ((a - b).pow(2).mean().sqrt() / scale).item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def assert_states_equal(a: MatrixMemoryState, b: MatrixMemoryState, tol: float = 1e-10) -> None:
    assert_close(a.S, b.S, tol)
    assert_close(a.P, b.P, tol)
    assert_close(a.log_decay, b.log_decay, tol)
    assert torch.equal(a.phase, b.phase)
    assert torch.equal(a.chunks_done, b.chunks_done)


def state_loss(o: Tensor, s: MatrixMemoryState, seed: int = 123) -> Tensor:
    """A random linear functional of the outputs and of every float field of the final state."""
    gen = torch.Generator().manual_seed(seed)
    total = o.new_zeros(())
    for x in (o, s.S, s.P, s.log_decay):
        total = total + (x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum()
    return total


# ----------------------------------------------------------------------------------------------
# 1. The reference against closed-form recurrences written out independently.
# ----------------------------------------------------------------------------------------------


def _unpack(xs: Inputs) -> tuple[Tensor, ...]:
    q, k, v, lr_logit, retain_logit, init = (x.detach() for x in xs)
    return q, k, v, torch.sigmoid(lr_logit), 0.5 + 0.5 * torch.sigmoid(retain_logit), init


def _closed_form_c1(xs: Inputs, decay: str) -> tuple[Tensor, Tensor]:
    """C = 1 l2: "after" S_t = S(αI - η k kᵀ) + η v kᵀ; "before" S_t = α S(I - η k kᵀ) + η v kᵀ."""
    q, k, v, lr, retain, init = _unpack(xs)
    S = init.expand(B, *init.shape).clone()
    eye = torch.eye(DK, dtype=F64)
    outs = []
    for t in range(q.shape[2]):
        kt, a, eta = k[:, :, t], retain[:, :, t, None, None], lr[:, :, t, None, None]
        kkT = kt[..., :, None] * kt[..., None, :]
        vkT = v[:, :, t, :, None] * kt[..., None, :]
        if decay == "after":
            S = S @ (a * eye - eta * kkT) + eta * vkT
        else:
            S = a * S @ (eye - eta * kkT) + eta * vkT
        outs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, :, t]))
    return torch.stack(outs, 2), S


@pytest.mark.parametrize("decay", ["after", "before"])
def test_reference_c1_l2_closed_form(decay: str) -> None:
    xs = make_inputs(B, 23, seed=1)
    o, state = run(scan, xs, MatrixMemoryConfig("l2", decay, 1, "online"))
    o_ref, S_ref = _closed_form_c1(xs, decay)
    assert_close(o, o_ref, 1e-12)
    assert_close(state.S, S_ref, 1e-12)


@pytest.mark.parametrize("read", ["online", "before", "boundary"])
def test_reference_dot_closed_form(read: str) -> None:
    """dot, any C: S_t = α S_{t-1} + η v kᵀ; reads at t, t-1 or the chunk start b-1 (C = 4)."""
    xs = make_inputs(B, 19, seed=2)
    o, state = run(scan, xs, MatrixMemoryConfig("dot", "before", 4, read))
    q, k, v, lr, retain, init = _unpack(xs)
    S = init.expand(B, *init.shape).clone()
    chunk_start = S
    outs = []
    for t in range(q.shape[2]):
        if t % 4 == 0:
            chunk_start = S
        previous = S
        S = retain[:, :, t, None, None] * S + lr[:, :, t, None, None] * v[:, :, t, :, None] * k[:, :, t, None, :]
        read_from = {"online": S, "before": previous, "boundary": chunk_start}[read]
        outs.append(torch.einsum("bhvk,bhk->bhv", read_from, q[:, :, t]))
    assert_close(o, torch.stack(outs, 2), 1e-12)
    assert_close(state.S, S, 1e-12)


@pytest.mark.parametrize("decay", ["after", "before"])
def test_reference_chunk4_l2_by_hand(decay: str) -> None:
    """C = 4 l2: gradients of a chunk all taken at S_{b-1} (times α_b⋯α_t for "before")."""
    steps = 18
    xs = make_inputs(B, steps, seed=3)
    o, state = run(scan, xs, MatrixMemoryConfig("l2", decay, 4, "online"))
    q, k, v, lr, retain, init = _unpack(xs)
    S = init.expand(B, *init.shape).clone()
    outs = []
    for b in range(0, steps, 4):
        base = S
        gamma = torch.ones(B, H, 1, 1, dtype=F64)
        for t in range(b, min(b + 4, steps)):
            a = retain[:, :, t, None, None]
            gamma = gamma * a
            lin = base if decay == "after" else gamma * base
            residual = torch.einsum("bhvk,bhk->bhv", lin, k[:, :, t]) - v[:, :, t]
            S = a * S - lr[:, :, t, None, None] * residual[..., :, None] * k[:, :, t, None, :]
            outs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, :, t]))
    assert_close(o, torch.stack(outs, 2), 1e-12)
    assert_close(state.S, S, 1e-12)


# ----------------------------------------------------------------------------------------------
# 2. chunked == scan: outputs, final state and all gradients.
# ----------------------------------------------------------------------------------------------

CHUNK_LENGTHS = [(1, 63), (1, 65), (1, 131)] + [(c, t) for c in (4, 16) for t in (c - 1, c + 1, 37)]


ALL_MODES = list(
    itertools.product(
        ["dot", "l2"], ["after", "before"], ["online", "before", "boundary"], ["through", "stop", "truncate"]
    )
)


def check_against_scan(cfg: MatrixMemoryConfig, steps: int, seed: int, block: int = 64) -> None:
    """chunked == scan in outputs, final state and the gradients of q, k, v, lr, retain, init."""
    xs = make_inputs(B, steps, seed=seed)
    o_ref, s_ref = run(scan, xs, cfg)
    o, s = run(chunked, xs, cfg, block=block)
    assert_close(o, o_ref)
    assert_states_equal(s, s_ref)
    g_ref = torch.autograd.grad(state_loss(o_ref, s_ref), xs, allow_unused=True)
    g = torch.autograd.grad(state_loss(o, s), xs, allow_unused=True)
    for name, a, b in zip(["q", "k", "v", "lr", "retain", "init"], g, g_ref):
        a = torch.zeros_like(xs[0]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        try:
            assert_close(a, b)
        except AssertionError as exc:
            raise AssertionError(f"grad {name}, C={cfg.chunk}, T={steps}, block={block}: {exc}") from None


@pytest.mark.parametrize("objective,decay,read,grad", ALL_MODES)
def test_chunked_matches_scan(objective: str, decay: str, read: str, grad: str) -> None:
    for seed, (chunk, steps) in enumerate(CHUNK_LENGTHS):
        cfg = MatrixMemoryConfig(objective, decay, chunk, read, grad, truncate_k=2)
        check_against_scan(cfg, steps, seed=100 + seed)


@pytest.mark.parametrize("objective,decay,read,grad", ALL_MODES)
def test_chunked_chunks_straddle_blocks(objective: str, decay: str, read: str, grad: str) -> None:
    """Small blocks (7) that cut chunks (C = 3, 9) in the middle: the carried P / log_decay path."""
    for chunk in (3, 9):
        cfg = MatrixMemoryConfig(objective, decay, chunk, read, grad, truncate_k=2)
        check_against_scan(cfg, 40, seed=200 + chunk, block=7)


def test_chunked_fp32() -> None:
    """fp32 stays within 1e-5 relative error of the fp64 reference."""
    cfg = MatrixMemoryConfig("l2", "before", 1, "online")
    xs = make_inputs(B, 131, seed=7)
    o_ref, s_ref = run(scan, xs, cfg)
    xs32 = tuple(x.detach().float() for x in xs)
    o32, s32 = run(chunked, xs32, cfg)  # type: ignore[arg-type]
    assert_close(o32.double(), o_ref, 1e-5)
    assert_close(s32.S.double(), s_ref.S, 1e-5)


# ----------------------------------------------------------------------------------------------
# 3. Streaming: pieces with a carried state equal one call.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [scan, chunked], ids=["scan", "chunked"])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize(
    "objective,decay,read,grad",
    [
        ("l2", "before", "boundary", "truncate"),
        ("l2", "after", "before", "through"),
        ("dot", "before", "online", "stop"),
    ],
)
def test_streaming(fn: Run, chunk: int, objective: str, decay: str, read: str, grad: str) -> None:
    cfg = MatrixMemoryConfig(objective, decay, chunk, read, grad, truncate_k=2)
    xs = make_inputs(B, 48, seed=11)
    o_full, s_full = run(fn, xs, cfg)
    q, k, v, lr_logit, retain_logit, init = xs
    lr, retain = torch.sigmoid(lr_logit), 0.5 + 0.5 * torch.sigmoid(retain_logit)
    state = MatrixMemoryState.initial(init, B)
    pieces = []
    for a, b in [(0, 5), (5, 21), (21, 48)]:
        o, state = fn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], lr[:, :, a:b], retain[:, :, a:b], state, cfg)
        pieces.append(o)
    o_stream = torch.cat(pieces, 2)
    assert_close(o_stream, o_full)
    assert_states_equal(state, s_full)
    g_full = torch.autograd.grad(state_loss(o_full, s_full), xs, allow_unused=True)
    g_stream = torch.autograd.grad(state_loss(o_stream, state), xs, allow_unused=True)
    for a_, b_ in zip(g_stream, g_full):
        assert (a_ is None) == (b_ is None)
        if a_ is not None and b_ is not None:
            assert_close(a_, b_)


# ----------------------------------------------------------------------------------------------
# 4. Padding and per-row phases: every row behaves as if it were alone.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [scan, chunked], ids=["scan", "chunked"])
@pytest.mark.parametrize("grad", ["through", "truncate"])
@pytest.mark.parametrize("read", ["online", "boundary"])
def test_padding_and_phases(fn: Run, grad: str, read: str) -> None:
    cfg = MatrixMemoryConfig("l2", "before", 4, read, grad, truncate_k=2)
    steps, prefixes, lengths = 21, [3, 6], [21, 13]
    # Per-row starting states with different phases (3, 2) and chunk counts (0, 1).
    starts = []
    for row, prefix in enumerate(prefixes):
        _, s = run(chunked, make_inputs(1, prefix, seed=20 + row), cfg)
        starts.append(
            MatrixMemoryState(s.S.detach(), s.P.detach(), s.log_decay.detach(), s.phase, s.chunks_done, s.init.detach())
        )
    xs = make_inputs(B, steps, seed=30)
    q, k, v, lr_logit, retain_logit, _ = xs
    lr, retain = torch.sigmoid(lr_logit), 0.5 + 0.5 * torch.sigmoid(retain_logit)
    both = MatrixMemoryState.cat(starts)
    o, s = fn(q, k, v, lr, retain, both, cfg, lengths=torch.tensor(lengths))
    weights = _loss_weights(o, s)

    for row, n in enumerate(lengths):
        sl = (slice(row, row + 1), slice(None), slice(0, n))
        o_row, s_row = fn(q[sl], k[sl], v[sl], lr[sl], retain[sl], starts[row], cfg)
        assert_close(o[sl], o_row)
        assert_states_equal(s.select(row), s_row)
        assert torch.all(o[row, :, n:] == 0)
        # Gradients of the same per-row loss; those of the batch must vanish on padding/other rows.
        w = [x[row : row + 1] for x in weights]
        loss = _weighted(o[row : row + 1], s.select(row), w)
        g_batch = torch.autograd.grad(loss, xs[:5], retain_graph=True, allow_unused=True)
        w[0] = w[0][:, :, :n]
        g_alone = torch.autograd.grad(_weighted(o_row, s_row, w), xs[:5], retain_graph=True, allow_unused=True)
        for a, b in zip(g_batch, g_alone):
            assert a is not None and b is not None
            assert_close(a, b)


def _loss_weights(o: Tensor, s: MatrixMemoryState) -> list[Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in (o, s.S, s.P, s.log_decay)]


def _weighted(o: Tensor, s: MatrixMemoryState, w: list[Tensor]) -> Tensor:
    return sum((x * wx).sum() for x, wx in zip((o, s.S, s.P, s.log_decay), w))  # type: ignore[return-value]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        MatrixMemoryConfig("l3", "after", 1, "online")
    with pytest.raises(ValueError):
        MatrixMemoryConfig("l2", "after", 0, "online")
    with pytest.raises(ValueError):
        MatrixMemoryConfig("l2", "after", 1, "online", "truncate", truncate_k=0)

"""Tests of the `kv` memory level: reference vs whole-call fast path, streaming, padding, persistent memory."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from nestc_runtime.ops.attention import AttentionConfig, AttentionState, attend, scan, step

F64 = torch.float64
B, H, DK, DV = 2, 2, 4, 3

Run = Callable[..., tuple[Tensor, AttentionState]]
Inputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def make_inputs(steps: int, persistent: int, seed: int, dtype: torch.dtype = F64, batch: int = B) -> Inputs:
    """Leaf tensors q, k, v (B,H,T,·) and persistent keys/values (H,P,·), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    return (
        rand(batch, H, steps, DK),
        rand(batch, H, steps, DK),
        rand(batch, H, steps, DV),
        *(
            rand(H, persistent, DK),
            rand(H, persistent, DV),
        ),
    )


def initial(xs: Inputs, batch: int = B) -> AttentionState:
    _, _, _, pk, pv = xs
    return AttentionState.initial(batch, H, DK, DV, (pk, pv) if pk.shape[1] else None, dtype=pk.dtype)


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    """Relative error RMSE(a - b) / RMS(b) ≤ tol (absolute when b is all zeros)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.pow(2).mean().sqrt().clamp_min(1e-12) if b.numel() else torch.tensor(1.0)
    err = ((a - b).pow(2).mean().sqrt() / scale).item() if b.numel() else 0.0
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def assert_states_equal(a: AttentionState, b: AttentionState, tol: float = 1e-10) -> None:
    assert torch.equal(a.length, b.length)
    assert torch.equal(a.position, b.position)
    a, b = a.trim(), b.trim()
    assert_close(a.keys, b.keys, tol)
    assert_close(a.values, b.values, tol)


def loss_of(o: Tensor, s: AttentionState, seed: int = 7) -> Tensor:
    """A random linear functional of the outputs and of the (trimmed) final cache."""
    gen = torch.Generator().manual_seed(seed)
    s = s.trim()
    total = o.new_zeros(())
    for x in (o, s.keys, s.values):
        total = total + (x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum()
    return total


def grads(xs: Inputs, loss: Tensor) -> list[Tensor]:
    return [
        g if g is not None else torch.zeros_like(x)
        for g, x in zip(torch.autograd.grad(loss, xs, allow_unused=True), xs)
    ]


CONFIGS = [
    AttentionConfig(read=read, window=window, segment=segment)
    for read, window, segment in itertools.product(("online", "before"), (None, 5), (None, 8))
]


def cfg_id(cfg: AttentionConfig) -> str:
    return f"{cfg.read}-w{cfg.window}-s{cfg.segment}"


# ----------------------------------------------------------------------------------------------
# 1. The reference against softmax attention written out token by token, key by key.
# ----------------------------------------------------------------------------------------------


def _by_hand(xs: Inputs, cfg: AttentionConfig, lengths: list[int]) -> Tensor:
    q, k, v, pk, pv = (x.detach() for x in xs)
    steps = q.shape[2]
    out = torch.zeros(B, H, steps, DV, dtype=q.dtype)
    scale = 1 / math.sqrt(DK) if cfg.scale is None else cfg.scale
    for b, h, t in itertools.product(range(B), range(H), range(steps)):
        if t >= lengths[b]:
            continue
        visible = []
        for s in range(t + 1):
            if cfg.read == "before" and s == t:
                continue
            if cfg.window is not None and t - s >= cfg.window + (cfg.read == "before"):
                continue
            if cfg.segment is not None and s // cfg.segment != t // cfg.segment:
                continue
            visible.append(s)
        keys = [pk[h, i] for i in range(pk.shape[1])] + [k[b, h, s] for s in visible]
        values = [pv[h, i] for i in range(pv.shape[1])] + [v[b, h, s] for s in visible]
        if not keys:
            continue  # an empty cache reads 0
        scores = torch.stack([float(scale) * torch.dot(key, q[b, h, t]) for key in keys])
        probs = torch.exp(scores - scores.max())
        probs = probs / probs.sum()
        out[b, h, t] = sum(p * val for p, val in zip(probs, values))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        AttentionConfig(read="online", window=5),
        AttentionConfig(read="before"),
        AttentionConfig(read="before", window=3, segment=6, scale=0.7),
    ],
    ids=cfg_id,
)
@pytest.mark.parametrize("persistent", [0, 2])
def test_reference_and_fast_path_by_hand(cfg: AttentionConfig, persistent: int) -> None:
    xs = make_inputs(13, persistent, seed=1)
    lengths = [13, 9]
    expected = _by_hand(xs, cfg, lengths)
    for fn in (scan, attend):
        o, _ = fn(*xs[:3], initial(xs), cfg, lengths=torch.tensor(lengths))
        assert_close(o.detach(), expected)


def test_empty_before_read_is_zero_and_grads_finite() -> None:
    xs = make_inputs(4, 0, seed=2)
    cfg = AttentionConfig(read="before", segment=2)
    for fn in (scan, attend):
        o, s = fn(*xs[:3], initial(xs), cfg)
        assert torch.equal(o[:, :, 0::2], torch.zeros_like(o[:, :, 0::2]))  # segment starts see nothing
        for g in grads(xs, loss_of(o, s)):
            assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------------------------
# 2. Fast path against the reference: outputs, final state and gradients (q, k, v, persistent).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 7, 33])
@pytest.mark.parametrize("persistent", [0, 3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_attend_matches_scan(steps: int, persistent: int, cfg: AttentionConfig) -> None:
    xs = make_inputs(steps, persistent, seed=steps + 10 * persistent)
    lengths = torch.tensor([steps, max(steps - 4, 0)])
    o_ref, s_ref = scan(*xs[:3], initial(xs), cfg, lengths=lengths)
    o_fast, s_fast = attend(*xs[:3], initial(xs), cfg, lengths=lengths)
    assert_close(o_fast, o_ref)
    assert_states_equal(s_fast, s_ref)
    assert torch.equal(o_fast[1, :, int(lengths[1]) :], torch.zeros_like(o_fast[1, :, int(lengths[1]) :]))
    for g_fast, g_ref in zip(grads(xs, loss_of(o_fast, s_fast)), grads(xs, loss_of(o_ref, s_ref))):
        assert_close(g_fast, g_ref)


def test_attend_fp32_against_fp64_reference() -> None:
    cfg = AttentionConfig(read="online", window=5, segment=8)
    xs64 = make_inputs(33, 3, seed=3)
    xs32 = tuple(x.detach().float().requires_grad_() for x in xs64)
    o_ref, _ = scan(*xs64[:3], initial(xs64), cfg)
    o32, _ = attend(*xs32[:3], initial(xs32), cfg)  # type: ignore[arg-type]
    assert_close(o32.double(), o_ref.detach(), tol=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. Streaming: pieces with a carried state equal one call (either implementation, or mixed).
# ----------------------------------------------------------------------------------------------


def _stream(
    fns: list[Run], xs: Inputs, cfg: AttentionConfig, cuts: list[int], lengths: Tensor
) -> tuple[Tensor, AttentionState]:
    q, k, v = xs[:3]
    state = initial(xs)
    pieces = []
    bounds = [0, *cuts, q.shape[2]]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        piece_lengths = (lengths - a).clamp(0, b - a)
        o, state = fns[i % len(fns)](q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, cfg, lengths=piece_lengths)
        pieces.append(o)
    return torch.cat(pieces, dim=2), state


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("fns", [[attend], [scan], [attend, scan]], ids=["attend", "scan", "mixed"])
def test_streaming(cfg: AttentionConfig, fns: list[Run]) -> None:
    xs = make_inputs(33, 3, seed=4)
    lengths = torch.tensor([33, 20])
    o_one, s_one = attend(*xs[:3], initial(xs), cfg, lengths=lengths)
    o_str, s_str = _stream(fns, xs, cfg, [1, 5, 6, 17, 24], lengths)
    assert_close(o_str, o_one)
    assert_states_equal(s_str, s_one)
    for g_str, g_one in zip(grads(xs, loss_of(o_str, s_str)), grads(xs, loss_of(o_one, s_one))):
        assert_close(g_str, g_one)


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("fn", [attend, scan], ids=["attend", "scan"])
def test_padded_rows_equal_separate_documents(cfg: AttentionConfig, fn: Run) -> None:
    """Rows whose caches have different lengths (padding in the first call) match row-by-row runs."""
    xs = make_inputs(19, 3, seed=5)
    q, k, v = xs[:3]
    first = torch.tensor([9, 4])
    o1, s = fn(q[:, :, :9], k[:, :, :9], v[:, :, :9], initial(xs), cfg, lengths=first)
    o2, s = fn(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], s, cfg)
    for row, n in enumerate(first.tolist()):
        sel = [torch.cat([x[row : row + 1, :, :n], x[row : row + 1, :, 9:]], dim=2) for x in (q, k, v)]
        o_row, s_row = attend(*sel, initial(xs, batch=1), cfg)
        assert_close(torch.cat([o1[row, :, :n], o2[row]], dim=1), o_row[0])
        assert_states_equal(s.select(row), s_row)


def test_step_padding_leaves_state_untouched() -> None:
    xs = make_inputs(3, 2, seed=6)
    cfg = AttentionConfig(read="online", window=2, segment=2)
    q, k, v = xs[:3]
    _, s = scan(q, k, v, initial(xs), cfg)
    o, s2 = step(s, q[:, :, 0], k[:, :, 0], v[:, :, 0], cfg, valid_t=torch.tensor([False, True]))
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    assert_states_equal(s2.select(0), s.select(0))
    assert int(s2.position[1]) == 4


def test_state_helpers_and_config() -> None:
    xs = make_inputs(5, 0, seed=8)
    cfg = AttentionConfig()
    _, s = attend(*xs[:3], initial(xs), cfg, lengths=torch.tensor([5, 2]))
    both = AttentionState.cat([s.select(0), s.select(1)])
    assert_states_equal(both, s)
    assert not s.detach().keys.requires_grad
    assert AttentionConfig(window=4, segment=3).capacity == 3
    for bad in ({"read": "boundary"}, {"window": 0}, {"segment": 1.5}):
        with pytest.raises(ValueError):
            AttentionConfig(**bad)  # type: ignore[arg-type]

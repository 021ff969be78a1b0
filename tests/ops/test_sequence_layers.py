"""Tests of the sequence layers: conv and rope (step vs forward, streaming, padding) and the stateless layers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nestc_runtime.ops.sequence_layers import (
    STATELESS_LAYERS,
    CausalConv,
    ConvState,
    Gate,
    LayerNorm,
    Rope,
    RopeState,
    SiLU,
    SwiGLU,
    swiglu_hidden,
)

F64 = torch.float64
B, T, D = 2, 17, 6


def rand(*shape: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64)


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-12) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def make_conv(kernel: int, bias: bool = True) -> CausalConv:
    torch.manual_seed(kernel)
    conv = CausalConv(D, kernel, bias=bias).double()
    if bias:
        with torch.no_grad():
            conv.bias.normal_()  # type: ignore[union-attr]
    return conv


# ----------------------------------------------------------------------------------------------
# conv(k)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 2, 4, 9])  # 9: past SHIFTED_MAX, the conv1d path
def test_conv_formula(kernel: int) -> None:
    conv = make_conv(kernel)
    x = rand(B, T, D)
    y, state = conv(x)
    expected = torch.zeros_like(x)
    for t, j in itertools.product(range(T), range(kernel)):
        if t - j >= 0:
            expected[:, t] += conv.weight[:, j].detach() * x[:, t - j]
    expected += conv.bias.detach()  # type: ignore[union-attr]
    assert_close(y.detach(), expected)
    assert_close(state.history, x[:, T - kernel + 1 :] if kernel > 1 else x[:, :0])


@pytest.mark.parametrize("kernel", [1, 3, 4, 9])
def test_conv_step_streaming_padding(kernel: int) -> None:
    conv = make_conv(kernel)
    x = rand(B, T, D, seed=1).requires_grad_()
    lengths = torch.tensor([T, 10])
    y_one, s_one = conv(x, lengths=lengths)
    # Reference: the token step loop.
    state: ConvState | None = None
    ys = []
    for t in range(T):
        y_t, state = conv.step(x[:, t], state, valid_t=lengths > t)
        ys.append(y_t)
    assert state is not None
    assert_close(torch.stack(ys, 1), y_one)
    assert_close(state.history, s_one.history)
    assert_close(s_one.history[1], x[1, 10 - kernel + 1 : 10].detach() if kernel > 1 else x[1, :0].detach())
    assert torch.equal(y_one[1, 10:], torch.zeros_like(y_one[1, 10:]))
    # Pieces with a carried state equal one call (outputs, state and gradients).
    pieces, s = [], None
    for a, b in itertools.pairwise([0, 1, 2, 7, 12, T]):
        y, s = conv(x[:, a:b], s, lengths=(lengths - a).clamp(0, b - a))
        pieces.append(y)
    assert s is not None
    y_str = torch.cat(pieces, 1)
    assert_close(y_str, y_one)
    assert_close(s.history, s_one.history)
    w = rand(B, T, D, seed=9)
    g_one = torch.autograd.grad((y_one * w).sum(), (x, conv.weight))
    g_str = torch.autograd.grad((y_str * w).sum(), (x, conv.weight))
    for g1, g2 in zip(g_one, g_str):
        assert_close(g1, g2)


def test_conv_document_start_is_zeros() -> None:
    conv = make_conv(3, bias=False)
    x = rand(B, 4, D, seed=2)
    y, _ = conv(x, ConvState(torch.zeros(B, 2, D, dtype=F64)))
    assert_close(y, conv(x)[0])
    assert_close(y[:, 0], conv.weight[:, 0].detach() * x[:, 0])


# ----------------------------------------------------------------------------------------------
# rope
# ----------------------------------------------------------------------------------------------


def _rope_by_hand(x: Tensor, positions: list[int], base: float = 10000.0) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by m·base^(−2i/dh), one scalar at a time."""
    out = torch.empty_like(x)
    dh = x.shape[-1]
    for b, h, t in itertools.product(range(x.shape[0]), range(x.shape[1]), range(x.shape[2])):
        m = positions[t]
        for i in range(dh // 2):
            angle = m * base ** (-2 * i / dh)
            c, s = math.cos(angle), math.sin(angle)
            e, o = x[b, h, t, 2 * i].item(), x[b, h, t, 2 * i + 1].item()
            out[b, h, t, 2 * i] = e * c - o * s
            out[b, h, t, 2 * i + 1] = e * s + o * c
    return out


def test_rope_formula() -> None:
    rope = Rope(8)
    q, k = rand(B, 2, 5, 8, seed=3), rand(B, 2, 5, 8, seed=4)
    q_r, k_r, state = rope(q, k, RopeState(torch.tensor([0, 100])))
    assert_close(q_r[0:1], _rope_by_hand(q[0:1], list(range(5))))
    assert_close(k_r[1:2], _rope_by_hand(k[1:2], list(range(100, 105))))
    assert torch.equal(state.position, torch.tensor([5, 105]))


def test_rope_norms_and_relative_positions() -> None:
    rope = Rope(16)
    x = rand(1, 1, 1, 16, seed=5)
    y = rand(1, 1, 1, 16, seed=6)
    for m in (0, 3, 1000):
        xm = rope.rotate(x, torch.tensor([[m]]))
        assert_close(xm.norm(dim=-1), x.norm(dim=-1))
    # q_m · k_n depends on m − n only.
    dots: dict[int, list[Tensor]] = {}
    for m, n in [(5, 2), (3, 0), (1003, 1000), (2, 5), (0, 3), (40, 43)]:
        qm = rope.rotate(x, torch.tensor([[m]]))
        kn = rope.rotate(y, torch.tensor([[n]]))
        dots.setdefault(m - n, []).append((qm * kn).sum())
    for values in dots.values():
        for v in values[1:]:
            assert_close(v, values[0], tol=1e-10)
    assert not torch.allclose(dots[3][0], dots[-3][0])


def test_rope_step_streaming_padding() -> None:
    rope = Rope(4)
    q, k = rand(B, 3, T, 4, seed=7), rand(B, 3, T, 4, seed=8)
    lengths = torch.tensor([T, 11])
    q_one, k_one, s_one = rope(q, k, lengths=lengths)
    state: RopeState | None = None
    qs, ks = [], []
    for t in range(T):
        q_t, k_t, state = rope.step(q[:, :, t], k[:, :, t], state, valid_t=lengths > t)
        qs.append(q_t)
        ks.append(k_t)
    assert state is not None
    assert_close(torch.stack(qs, 2), q_one)
    assert_close(torch.stack(ks, 2), k_one)
    assert torch.equal(state.position, s_one.position)
    assert torch.equal(s_one.position, lengths)
    assert torch.equal(q_one[1, :, 11:], torch.zeros_like(q_one[1, :, 11:]))
    qp, kp, s = [], [], None
    for a, b in itertools.pairwise([0, 4, 5, 13, T]):
        q_r, k_r, s = rope(q[:, :, a:b], k[:, :, a:b], s, lengths=(lengths - a).clamp(0, b - a))
        qp.append(q_r)
        kp.append(k_r)
    assert s is not None
    assert_close(torch.cat(qp, 2), q_one)
    assert_close(torch.cat(kp, 2), k_one)
    assert torch.equal(s.position, s_one.position)


def test_rope_rejects_odd_dim() -> None:
    with pytest.raises(ValueError):
        Rope(5)


# ----------------------------------------------------------------------------------------------
# Stateless layers against their formulas
# ----------------------------------------------------------------------------------------------


def test_swiglu() -> None:
    assert swiglu_hidden(64) == 176
    assert swiglu_hidden(48) == 128
    assert swiglu_hidden(768) == 2048
    assert swiglu_hidden(10, expand=2) == 24
    torch.manual_seed(0)
    layer = SwiGLU(D).double()
    assert layer.hidden == 16
    x = rand(3, 4, D, seed=10)
    wg, wu, wd = (m.weight.detach() for m in (layer.gate, layer.up, layer.down))
    h = x @ wg.T
    expected = ((h / (1 + torch.exp(-h))) * (x @ wu.T)) @ wd.T
    assert_close(layer(x), expected)
    assert_close(layer(x[0, 0]), expected[0, 0])  # any leading shape


def test_layernorm() -> None:
    layer = LayerNorm(D).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = rand(2, 3, D, seed=11)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * layer.weight.detach() + layer.bias.detach()
    assert_close(layer(x), expected)


def test_gate_and_silu() -> None:
    torch.manual_seed(0)
    gate = Gate(D).double()
    x, a = rand(5, D, seed=12), rand(5, D, seed=13)
    s = 1 / (1 + torch.exp(-(x @ gate.proj.weight.detach().T)))
    assert_close(gate(x), x * s)
    assert_close(gate(x, a), a * s)
    assert_close(SiLU()(x), x / (1 + torch.exp(-x)))


def test_registry() -> None:
    assert set(STATELESS_LAYERS) == {"swiglu", "layernorm", "gate", "silu"}
    x = torch.randn(2, 3, 8)
    for make in STATELESS_LAYERS.values():
        assert make(8, 100)(x).shape == x.shape


def test_gradients_flow() -> None:
    conv = make_conv(3)
    x = rand(B, 5, D, seed=14).requires_grad_()
    y, _ = conv(x)
    y = F.silu(y).sum()
    y.backward()
    assert x.grad is not None and conv.weight.grad is not None

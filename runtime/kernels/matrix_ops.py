"""The generated matrix-memory kernels as `torch.library` custom ops.

`nestc::matrix_memory_forward(key, q, k, v, eta, log_retain, s0) -> (o, s_end, h)` runs the generated
forward kernel of `key` (one program per batch row and head): o (B,H,T,DV) in v's dtype, the state after the
last token s_end (s0's dtype) and the state at every block start h (B,H,NB,DV,DK, float32), which the
backward recomputes each block from. `nestc::matrix_memory_backward` runs the generated backward kernel.
Both have fake-tensor implementations (shapes only) and the forward has an autograd formula, so
`torch.compile` traces through them as single nodes. Importing this module does not import Triton:
the generated module (which imports it) is loaded at the first launch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .key import MatrixKernelKey
from .source import kernel_module


def blocks(steps: int, key: MatrixKernelKey) -> int:
    return -(-steps // key.block)


def _dims(key: str, q: Tensor) -> tuple[MatrixKernelKey, int, int, int, int]:
    spec = MatrixKernelKey.parse(key)
    batch, heads, steps, _ = q.shape
    return spec, batch, heads, steps, blocks(steps, spec)


@torch.library.custom_op("nestc::matrix_memory_forward", mutates_args=())
def matrix_memory_forward(
    key: str, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_retain: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    spec, batch, heads, steps, nb = _dims(key, q)
    q, k, v, eta, log_retain, s0 = (x.contiguous() for x in (q, k, v, eta, log_retain, s0))
    o = v.new_empty(batch, heads, steps, spec.d_value)
    h = torch.empty(batch, heads, nb, spec.d_value, spec.d_key, dtype=torch.float32, device=q.device)
    s_end = torch.empty_like(s0)
    kernel_module(spec).forward_kernel[(batch * heads,)](q, k, v, eta, log_retain, s0, o, h, s_end, steps, nb)
    return o, s_end, h


@matrix_memory_forward.register_fake
def _forward_fake(
    key: str, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_retain: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    spec, batch, heads, steps, nb = _dims(key, q)
    o = v.new_empty(batch, heads, steps, spec.d_value)
    h = q.new_empty(batch, heads, nb, spec.d_value, spec.d_key, dtype=torch.float32)
    return o, torch.empty_like(s0), h


@torch.library.custom_op("nestc::matrix_memory_backward", mutates_args=())
def matrix_memory_backward(
    key: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    log_retain: Tensor,
    s0: Tensor,
    h: Tensor,
    do: Tensor,
    ds_end: Tensor,
    dh: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec, batch, heads, steps, nb = _dims(key, q)
    q, k, v, eta, log_retain, h, do, ds_end, dh = (
        x.contiguous() for x in (q, k, v, eta, log_retain, h, do, ds_end, dh)
    )
    grads = [torch.empty_like(x) for x in (q, k, v, eta, log_retain)]
    ds0 = torch.empty_like(s0, memory_format=torch.contiguous_format)
    kernel_module(spec).backward_kernel[(batch * heads,)](
        q, k, v, eta, log_retain, h, do, ds_end, dh, *grads, ds0, steps, nb
    )
    dq, dk, dv, deta, dlog_retain = grads
    return dq, dk, dv, deta, dlog_retain, ds0


@matrix_memory_backward.register_fake
def _backward_fake(
    key: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    log_retain: Tensor,
    s0: Tensor,
    h: Tensor,
    do: Tensor,
    ds_end: Tensor,
    dh: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, deta, dlog_retain, ds0 = (
        torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, eta, log_retain, s0)
    )
    return dq, dk, dv, deta, dlog_retain, ds0


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    key, q, k, v, eta, log_retain, s0 = inputs
    ctx.key = key
    ctx.save_for_backward(q, k, v, eta, log_retain, s0, output[2])


def _backward(ctx: Any, do: Tensor | None, ds_end: Tensor | None, dh: Tensor | None) -> tuple[Any, ...]:
    q, k, v, eta, log_retain, s0, h = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do
    ds_end = torch.zeros_like(s0) if ds_end is None else ds_end
    dh = torch.zeros_like(h) if dh is None else dh
    grads = matrix_memory_backward(ctx.key, q, k, v, eta, log_retain, s0, h, do, ds_end, dh)
    return (None, *grads)


matrix_memory_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- momentum_gd: two carried states (S and the momentum m), one more rate (log β)


@torch.library.custom_op("nestc::matrix_momentum_forward", mutates_args=())
def matrix_momentum_forward(
    key: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    log_retain: Tensor,
    log_momentum: Tensor,
    s0: Tensor,
    m0: Tensor,
    lengths: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """lengths: (B·H,) int32, each row's number of tokens (the rest of T is padding)."""
    spec, batch, heads, steps, nb = _dims(key, q)
    q, k, v, eta, log_retain, log_momentum, s0, m0 = (
        x.contiguous() for x in (q, k, v, eta, log_retain, log_momentum, s0, m0)
    )
    o = v.new_empty(batch, heads, steps, spec.d_value)
    hs, hm = (
        torch.empty(batch, heads, nb, spec.d_value, spec.d_key, dtype=torch.float32, device=q.device) for _ in range(2)
    )
    s_end, m_end = torch.empty_like(s0), torch.empty_like(m0)
    kernel_module(spec).forward_kernel[(batch * heads,)](
        q, k, v, eta, log_retain, log_momentum, s0, m0, o, hs, hm, s_end, m_end, lengths.contiguous(), steps, nb
    )
    return o, s_end, m_end, hs, hm


@matrix_momentum_forward.register_fake
def _momentum_forward_fake(
    key: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    log_retain: Tensor,
    log_momentum: Tensor,
    s0: Tensor,
    m0: Tensor,
    lengths: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec, batch, heads, steps, nb = _dims(key, q)
    o = v.new_empty(batch, heads, steps, spec.d_value)
    hs = q.new_empty(batch, heads, nb, spec.d_value, spec.d_key, dtype=torch.float32)
    return o, torch.empty_like(s0), torch.empty_like(m0), hs, torch.empty_like(hs)


@torch.library.custom_op("nestc::matrix_momentum_backward", mutates_args=())
def matrix_momentum_backward(
    key: str,
    saved: list[Tensor],
    grads_out: list[Tensor],
) -> list[Tensor]:
    """saved: q, k, v, eta, log_retain, log_momentum, s0, m0, lengths, hs, hm; grads_out: do, ds_end, dm_end,
    dhs, dhm. Returns the gradients of q, k, v, eta, log_retain, log_momentum, s0, m0 (zero past a row's length)."""
    q, k, v, eta, log_retain, log_momentum, s0, m0, lengths, hs, hm = (x.contiguous() for x in saved)
    do, ds_end, dm_end, dhs, dhm = (x.contiguous() for x in grads_out)
    spec, batch, heads, steps, nb = _dims(key, q)
    grads = [torch.zeros_like(x) for x in (q, k, v, eta, log_retain, log_momentum, s0, m0)]
    kernel_module(spec).backward_kernel[(batch * heads,)](
        q, k, v, eta, log_retain, log_momentum, hs, hm, do, ds_end, dm_end, dhs, dhm, *grads, lengths, steps, nb
    )
    return grads


@matrix_momentum_backward.register_fake
def _momentum_backward_fake(key: str, saved: list[Tensor], grads_out: list[Tensor]) -> list[Tensor]:
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in saved[:8]]


def _momentum_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.key = inputs[0]
    ctx.save_for_backward(*inputs[1:], output[3], output[4])


def _momentum_backward(ctx: Any, *grads_out: Tensor | None) -> tuple[Any, ...]:
    saved = list(ctx.saved_tensors)
    likes = (saved[2], saved[6], saved[7], saved[9], saved[10])  # o is shaped like v
    grads = [torch.zeros_like(like) if g is None else g for g, like in zip(grads_out, likes)]
    return (None, *matrix_momentum_backward(ctx.key, saved, grads), None)


matrix_momentum_forward.register_autograd(_momentum_backward, setup_context=_momentum_setup_context)

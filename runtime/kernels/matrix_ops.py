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

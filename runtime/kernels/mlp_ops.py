"""The generated MLP-memory kernel (forward and update) as a `torch.library` custom op.

`nestc::mlp_memory_forward(key, q, k, v, eta, log_retain, w1, w2) -> (o, w1_end, w2_end, h1, h2)` runs the
generated kernel of `key`: outputs, the weights after the last token and the weights at every chunk start.
Its backward `nestc::mlp_memory_backward` runs the generated backward kernel (chunks in reverse, each
recomputed from its start weights); torch.compile sees both as single nodes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .key import MLPKernelKey
from .source import kernel_module


def _dims(key: str, q: Tensor) -> tuple[MLPKernelKey, int, int, int, int]:
    spec = MLPKernelKey.parse(key)
    batch, heads, steps, _ = q.shape
    return spec, batch, heads, steps, -(-steps // spec.chunk)


@torch.library.custom_op("nestc::mlp_memory_forward", mutates_args=())
def mlp_memory_forward(
    key: str, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_retain: Tensor, w1: Tensor, w2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec, batch, heads, steps, nb = _dims(key, q)
    q, k, v, eta, log_retain, w1, w2 = (x.contiguous() for x in (q, k, v, eta, log_retain, w1, w2))
    o = torch.empty_like(q)
    h1 = torch.empty(batch, heads, nb, spec.d, spec.hidden, dtype=torch.float32, device=q.device)
    h2 = torch.empty(batch, heads, nb, spec.hidden, spec.d, dtype=torch.float32, device=q.device)
    w1_end, w2_end = torch.empty_like(w1), torch.empty_like(w2)
    kernel_module(spec).forward_kernel[(batch * heads,)](
        q, k, v, eta, log_retain, w1, w2, o, h1, h2, w1_end, w2_end, steps, nb
    )
    return o, w1_end, w2_end, h1, h2


@mlp_memory_forward.register_fake
def _forward_fake(
    key: str, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_retain: Tensor, w1: Tensor, w2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec, batch, heads, steps, nb = _dims(key, q)
    h1 = q.new_empty(batch, heads, nb, spec.d, spec.hidden, dtype=torch.float32)
    h2 = q.new_empty(batch, heads, nb, spec.hidden, spec.d, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(w1), torch.empty_like(w2), h1, h2


@torch.library.custom_op("nestc::mlp_memory_backward", mutates_args=())
def mlp_memory_backward(key: str, saved: list[Tensor], grads_out: list[Tensor]) -> list[Tensor]:
    """saved: q, k, v, eta, log_retain, w1, w2, h1, h2; grads_out: those of (o, w1_end, w2_end, h1, h2).
    Returns the gradients of q, k, v, eta, log_retain, w1, w2."""
    q, k, v, eta, log_retain, w1, w2, h1, h2 = (x.contiguous() for x in saved)
    do, dw1_end, dw2_end, dh1, dh2 = (x.contiguous() for x in grads_out)
    spec, batch, heads, steps, nb = _dims(key, q)
    grads = [torch.empty_like(x) for x in (q, k, v, eta, log_retain, w1, w2)]
    kernel_module(spec).backward_kernel[(batch * heads,)](
        q, k, v, eta, log_retain, h1, h2, do, dw1_end, dw2_end, dh1, dh2, *grads, steps, nb
    )
    return grads


@mlp_memory_backward.register_fake
def _backward_fake(key: str, saved: list[Tensor], grads_out: list[Tensor]) -> list[Tensor]:
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in saved[:7]]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.key = inputs[0]
    ctx.save_for_backward(*inputs[1:], output[3], output[4])


def _backward(ctx: Any, *grads_out: Tensor | None) -> tuple[Any, ...]:
    saved = list(ctx.saved_tensors)
    likes = (saved[0], saved[5], saved[6], saved[7], saved[8])  # o is shaped like q
    grads = [torch.zeros_like(like) if g is None else g for g, like in zip(grads_out, likes)]
    return (None, *mlp_memory_backward(ctx.key, saved, grads))


mlp_memory_forward.register_autograd(_backward, setup_context=_setup_context)

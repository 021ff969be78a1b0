"""The generated MLP-memory kernel (forward and update) as a `torch.library` custom op.

`nestc::mlp_memory_forward(key, q, k, v, eta, log_retain, w1, w2) -> (o, w1_end, w2_end, h1, h2)` runs the
generated kernel of `key`: outputs, the weights after the last token and the weights at every chunk start.
Its backward is `nestc::mlp_memory_backward`, which recomputes the same function with the runtime's chunked
PyTorch form under autograd (no generated backward kernel yet): the gradients are those of the PyTorch
path, and torch.compile sees both as single opaque nodes.
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


def _recompute(key: str, inputs: list[Tensor]) -> tuple[Tensor, ...]:
    """The kernel's function with the chunked PyTorch form: (o, w1_end, w2_end, h1, h2)."""
    from ..ops.mlp_memory import MLPMemoryConfig, MLPMemoryState, chunked

    spec = MLPKernelKey.parse(key)
    q, k, v, eta, log_retain, w1, w2 = (x.float() for x in inputs)  # computed in fp32, as the kernel does
    cfg = MLPMemoryConfig(objective=spec.objective, chunk=spec.chunk, read=spec.read, norm=spec.norm)
    state = MLPMemoryState.initial(w1, w2, q.shape[0])
    outputs, states = [], []
    for start in range(0, q.shape[2], spec.chunk):  # chunk by chunk, to expose the chunk-start weights
        piece = slice(start, start + spec.chunk)
        states.append(state)
        out, state = chunked(
            q[:, :, piece], k[:, :, piece], v[:, :, piece], eta[:, :, piece], log_retain[:, :, piece].exp(), state, cfg
        )
        outputs.append(out)
    h1 = torch.stack([s.W1 for s in states], 2).float()
    h2 = torch.stack([s.W2 for s in states], 2).float()
    dtypes = [x.dtype for x in inputs]
    return torch.cat(outputs, 2).to(dtypes[0]), state.W1.to(dtypes[5]), state.W2.to(dtypes[6]), h1, h2


@torch.library.custom_op("nestc::mlp_memory_backward", mutates_args=())
def mlp_memory_backward(key: str, inputs: list[Tensor], grads_out: list[Tensor]) -> list[Tensor]:
    """The gradients of q, k, v, eta, log_retain, w1, w2 given those of (o, w1_end, w2_end, h1, h2)."""
    # torch.func's vjp runs its own autograd level, so it works below the dispatcher's autograd key too
    pullback = torch.func.vjp(lambda *xs: _recompute(key, list(xs)), *inputs)[1]
    return [g.contiguous() for g in pullback(tuple(grads_out))]


@mlp_memory_backward.register_fake
def _backward_fake(key: str, inputs: list[Tensor], grads_out: list[Tensor]) -> list[Tensor]:
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.key = inputs[0]
    ctx.save_for_backward(*inputs[1:])
    ctx.likes = [(x.shape, x.dtype) for x in output]


def _backward(ctx: Any, *grads_out: Tensor | None) -> tuple[Any, ...]:
    inputs = list(ctx.saved_tensors)
    grads = [
        torch.zeros(shape, dtype=dtype, device=inputs[0].device) if g is None else g
        for g, (shape, dtype) in zip(grads_out, ctx.likes)
    ]
    return (None, *mlp_memory_backward(ctx.key, inputs, grads))


mlp_memory_forward.register_autograd(_backward, setup_context=_setup_context)

"""The MLP-memory op on generated Triton kernels (forward with the update, and backward): the contract of
`reference.scan` and `chunked.chunked`.

Covered: M(x) = x + [LN](W1 silu(W2 x)), objective `dot` or `l2`, optimizer `gd` with a per-head (or scalar)
retention, every C tokens with C in 16, 32, 64, outer gradient `through`, calls that start a chunk, head
dims 16-128 and hidden sizes 16-512, float32 or bfloat16. Everything else runs `chunked`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.key import BLOCKS, HEAD_DIMS, HIDDEN_DIMS, MLPKernelKey, fits_sm90
from ...kernels.source import available
from ..matrix_memory.triton import interpreting
from .chunked import chunked
from .state import MLPMemoryConfig, MLPMemoryState, safe_log

_DTYPE_WORDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def why_not(cfg: MLPMemoryConfig, q: Tensor, retain: Tensor, state: MLPMemoryState) -> str | None:
    """Why this call has no generated kernel, or None when it has one."""
    d, hidden = state.W1.shape[-2:]
    checks = [
        (cfg.objective in ("dot", "l2"), f"objective {cfg.objective}"),
        (cfg.optimizer == "gd", f"optimizer {cfg.optimizer}"),
        (cfg.chunk in BLOCKS, f"chunk {cfg.chunk}"),
        (cfg.grad == "through", f"outer gradient {cfg.grad}"),
        (cfg.activation == "silu" and cfg.ln_eps == 1e-5 and cfg.window == 1, "this activation, norm or window"),
        (retain.dim() == 3, "per-channel retention"),
        (d in HEAD_DIMS and hidden in HIDDEN_DIMS, f"sizes d={d}, hidden={hidden}"),
        (q.dtype in _DTYPE_WORDS, f"dtype {q.dtype}"),
        (q.is_cuda or (interpreting() and q.device.type == "cpu"), f"device {q.device} without TRITON_INTERPRET=1"),
        (q.shape[2] > 0, "an empty call"),
        (torch.compiler.is_compiling() or bool((state.phase == 0).all()), "a call that starts inside a chunk"),
    ]
    reason = next((f"no kernel for {what}" for ok, what in checks if not ok), None)
    if reason is None and q.is_cuda and not fits_sm90(kernel_key(cfg, d, hidden, q.dtype)):
        reason = "no kernel for these sizes within a GPU block's shared memory"
    if reason is None and not available(kernel_key(cfg, d, hidden, q.dtype)):
        reason = "no generated source for this kernel (load a `nestc compile -o` directory, or nestc.codegen.install())"
    return reason


def kernel_key(cfg: MLPMemoryConfig, d: int, hidden: int, dtype: torch.dtype) -> MLPKernelKey:
    return MLPKernelKey(cfg.objective, cfg.read, cfg.chunk, d, hidden, cfg.norm, _DTYPE_WORDS[dtype])


def triton_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    state: MLPMemoryState,
    cfg: MLPMemoryConfig,
    lengths: Tensor | None = None,
    momentum: Tensor | None = None,
) -> tuple[Tensor, MLPMemoryState]:
    """Same contract as `chunked.chunked`; the generated kernel where one exists, else `chunked`."""
    if why_not(cfg, q, retain, state) is not None:
        return chunked(q, k, v, lr, retain, state, cfg, lengths=lengths, momentum=momentum)
    from ...kernels.mlp_ops import mlp_memory_forward

    batch, _, steps, _ = q.shape
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=q.device)
    valid = torch.arange(steps, device=q.device)[None, :] < lengths[:, None]
    eta = torch.where(valid[:, None], lr.float(), 0.0)  # padding: η = 0 and α = 1 leave the weights alone
    log_retain = torch.where(valid[:, None], safe_log(retain.float()), 0.0)
    d, hidden = state.W1.shape[-2:]
    key = kernel_key(cfg, d, hidden, q.dtype).text()
    o, w1, w2, h1, h2 = mlp_memory_forward(key, q, k, v.to(q.dtype), eta, log_retain, state.W1, state.W2)
    consumed = (lengths > 0).view(-1, 1, 1, 1)
    rows = torch.arange(batch, device=q.device)
    last_chunk = (lengths - 1).clamp_min(0) // cfg.chunk
    offset = state.phase + lengths
    new_state = state.replace(
        W1=w1,
        W2=w2,
        P1=torch.where(consumed, h1[rows, :, last_chunk].to(w1.dtype), state.P1),
        P2=torch.where(consumed, h2[rows, :, last_chunk].to(w2.dtype), state.P2),
        phase=offset % cfg.chunk,
        chunks_done=state.chunks_done + offset // cfg.chunk,
    )
    return torch.where(valid[:, None, :, None], o, torch.zeros_like(o)), new_state

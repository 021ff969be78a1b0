"""The matrix-memory op on generated Triton kernels: the contract of `reference.scan` and `chunked.chunked`.

`kernel_key` names a call's kernel; `why_not` says why a call has none. Calls without one run
the chunked PyTorch path, which computes the same thing. What a kernel covers (runtime/kernels/key.py):
`dot`/`l2` with `gd` or `momentum_gd` (decay after or before) or `dgd`; C = 1 or C = the kernel block (16, 32, 64);
retention per head or scalar; outer gradient `through` or `stop` (truncation runs the chunked path); a
call that starts a chunk (phase 0 in every row, as every whole-sequence call does); float32 or bfloat16.

Around the kernel: padding tokens (beyond a row's length) get η = 0 and log α = 0, so they leave the state
untouched, and their outputs are zeroed; the carried state's P (the last chunk's start state) and
log_decay (the decay accumulated in it) are rebuilt from the kernel's block-start states and the log
retentions, as `chunked` does. At C = 1 every chunk is complete, so P is the dead state no read uses
(a token at phase 0 always linearises at S); it is set to the final S.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ...errors import RuntimeInputError
from ...kernels.key import BLOCKS, DTYPES, HEAD_DIMS, MatrixKernelKey, block_for_chunk, fits_sm90
from ...kernels.source import available
from .chunked import chunked
from .state import MatrixMemoryConfig, MatrixMemoryState, init_rows, safe_log_retain

_DTYPE_WORDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str) -> str:
    """The backend a model runs: `auto` is `triton` on a machine with a CUDA GPU and Triton, else `chunked`;
    `triton` without a GPU is an error unless Triton's interpreter is on (TRITON_INTERPRET=1)."""
    gpu = torch.cuda.is_available()
    if name == "auto":
        return "triton" if gpu and triton_available() else "chunked"
    if name == "triton":
        if not triton_available():
            raise RuntimeInputError("backend `triton` needs the triton package", hint="pip install triton (Linux)")
        if not gpu and not interpreting():
            raise RuntimeInputError(
                "backend `triton` needs a CUDA GPU",
                hint="use backend `chunked` or `auto` here, or set TRITON_INTERPRET=1 to run the kernels on the CPU",
            )
    return name


def why_not(
    cfg: MatrixMemoryConfig, q: Tensor, retain: Tensor, state: MatrixMemoryState, momentum: Tensor | None = None
) -> str | None:
    """Why this call has no generated kernel, or None when it has one."""
    uses_momentum = cfg.optimizer == "momentum_gd"
    checks = [
        (getattr(cfg, "window", 1) == 1, "a windowed objective"),
        (cfg.objective in ("dot", "l2"), f"objective {cfg.objective}"),
        (cfg.optimizer in ("gd", "dgd", "momentum_gd"), f"optimizer {cfg.optimizer}"),
        (not uses_momentum or (momentum is not None and momentum.dim() == 3), "a per-channel momentum rate"),
        (block_for_chunk(cfg.chunk) is not None, f"chunk {cfg.chunk} (kernels: 1, {', '.join(map(str, BLOCKS))})"),
        (cfg.grad in ("through", "stop"), f"outer gradient {cfg.grad}"),
        (retain.dim() == 3 and state.log_decay.dim() == 2, "per-channel retention"),
        (q.shape[-1] in HEAD_DIMS and state.S.shape[-2] in HEAD_DIMS, f"head dims {tuple(state.S.shape[-2:])}"),
        (_DTYPE_WORDS.get(q.dtype) in DTYPES, f"dtype {q.dtype}"),
        (q.is_cuda or (interpreting() and q.device.type == "cpu"), f"device {q.device} without TRITON_INTERPRET=1"),
        (q.shape[2] > 0, "an empty call"),
        (_starts_chunks(state), "a call that starts inside a chunk"),
    ]
    reason = next((f"no kernel for {what}" for ok, what in checks if not ok), None)
    if reason is None and q.is_cuda and not fits_sm90(kernel_key(cfg, q.shape[-1], state.S.shape[-2], q.dtype)):
        reason = "no kernel for these sizes within a GPU block's shared memory"
    if reason is None and not available(kernel_key(cfg, q.shape[-1], state.S.shape[-2], q.dtype)):
        reason = "no generated source for this kernel (load a `nestc compile -o` directory, or nestc.codegen.install())"
    return reason


def _starts_chunks(state: MatrixMemoryState) -> bool:
    """Every row is at a chunk start. Under torch.compile this cannot steer the graph (it is data), so a
    compiled graph takes the kernel and asserts it at run time instead of falling back."""
    at_start = (state.phase == 0).all()
    if torch.compiler.is_compiling():
        torch._assert_async(at_start, "the triton backend under torch.compile needs calls that start a chunk")
        return True
    return bool(at_start)


def kernel_key(cfg: MatrixMemoryConfig, d_key: int, d_value: int, dtype: torch.dtype) -> MatrixKernelKey:
    """The key of the kernel for a configuration (callers check `why_not` first)."""
    block = block_for_chunk(cfg.chunk, max(d_key, d_value))
    assert block is not None
    return MatrixKernelKey(
        objective=cfg.objective,
        optimizer=cfg.optimizer,
        decay=cfg.decay,
        read=cfg.read,
        chunk=cfg.chunk,
        block=block,
        d_key=d_key,
        d_value=d_value,
        dtype=_DTYPE_WORDS[dtype],
    )


def _carry(
    state: MatrixMemoryState,
    s_end: Tensor,
    h: Tensor,
    log_retain: Tensor,
    lengths: Tensor,
    cfg: MatrixMemoryConfig,
    m_end: Tensor | None = None,
) -> MatrixMemoryState:
    """The state after each row's last valid token (rows that consumed nothing keep theirs)."""
    consumed = lengths > 0
    last = (lengths - 1).clamp_min(0)
    if cfg.chunk == 1:
        P = s_end
    else:  # C = the kernel block: the last chunk started at the start of the last token's block
        rows = torch.arange(h.shape[0], device=h.device)
        P = h[rows, :, last // cfg.chunk].to(s_end.dtype)
    cumulative = log_retain.cumsum(2)
    chunk_start = last // cfg.chunk * cfg.chunk
    log_decay = _cumulative_at(cumulative, last) - _cumulative_at(cumulative, chunk_start - 1)
    keep = consumed.view(-1, 1, 1, 1)
    offset = state.phase + lengths
    return MatrixMemoryState(
        S=s_end,
        P=torch.where(keep, P, state.P),
        log_decay=torch.where(consumed[:, None], log_decay.to(state.log_decay.dtype), state.log_decay),
        phase=offset % cfg.chunk,
        chunks_done=state.chunks_done + offset // cfg.chunk,
        init=state.init,
        momentum=state.momentum if m_end is None else m_end,
    )


def _cumulative_at(cumulative: Tensor, index: Tensor) -> Tensor:
    """cumulative[b, h, index[b]] (B,H), 0 where index < 0."""
    heads = cumulative.shape[1]
    picked = cumulative.gather(2, index.clamp_min(0)[:, None, None].expand(-1, heads, 1))[..., 0]
    return torch.where((index >= 0)[:, None], picked, torch.zeros_like(picked))


def triton_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    state: MatrixMemoryState,
    cfg: MatrixMemoryConfig,
    lengths: Tensor | None = None,
    momentum: Tensor | None = None,
) -> tuple[Tensor, MatrixMemoryState]:
    """Same contract as `chunked.chunked`; runs the generated kernel where one exists, else `chunked`."""
    if why_not(cfg, q, retain, state, momentum) is not None:
        return chunked(q, k, v, lr, retain, state, cfg, lengths=lengths, momentum=momentum)
    from ...kernels.matrix_ops import matrix_memory_forward, matrix_momentum_forward

    batch, _, steps, _ = q.shape
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=q.device)
    valid = torch.arange(steps, device=q.device)[None, :] < lengths[:, None]
    stop = cfg.grad == "stop"
    carry = state.detach() if stop else state
    if stop:  # as in `chunked`: only q and θ_init get gradients; θ_init's comes back through δ below
        k, v, lr, retain = k.detach(), v.detach(), lr.detach(), retain.detach()
    eta = torch.where(valid[:, None], lr.float(), 0.0)
    log_retain = torch.where(valid[:, None], safe_log_retain(retain.float()), 0.0)
    key = kernel_key(cfg, q.shape[-1], v.shape[-1], q.dtype).text()
    if cfg.optimizer == "momentum_gd":
        assert momentum is not None
        beta = momentum.detach() if stop else momentum
        log_beta = torch.where(valid[:, None], safe_log_retain(beta.float()), 0.0)
        rows = lengths.to(torch.int32).repeat_interleave(q.shape[1])  # per (batch row, head)
        m0 = carry.momentum
        o, s_end, m_end, h, _ = matrix_momentum_forward(
            key, q, k, v.to(q.dtype), eta, log_retain, log_beta, carry.S, m0, rows
        )
        new_state = _carry(carry, s_end, h, log_retain, lengths, cfg, m_end)
    else:
        o, s_end, h = matrix_memory_forward(key, q, k, v.to(q.dtype), eta, log_retain, carry.S)
        new_state = _carry(carry, s_end, h, log_retain, lengths, cfg)
    if stop:
        start = init_rows(state.init, batch)
        delta = start - start.detach()
        o = o + (q @ delta.transpose(-1, -2).to(q.dtype)).to(o.dtype)
        new_state = MatrixMemoryState(
            S=new_state.S + delta,
            P=new_state.P + delta,
            log_decay=new_state.log_decay,
            phase=new_state.phase,
            chunks_done=new_state.chunks_done,
            init=state.init,
            momentum=new_state.momentum,
        )
    o = torch.where(valid[:, None, :, None], o, torch.zeros_like(o))
    return o, new_state

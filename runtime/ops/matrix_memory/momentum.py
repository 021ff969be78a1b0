"""Chunk-parallel form of a matrix memory under "momentum_gd" (Titans Eq. 13-14), decay after.

Inside a chunk every g_s = e_s k_sᵀ is taken at the chunk start P (DESIGN §3), e_s = -v_s ("dot") or the
objective's residual of P k_s - v_s, so with m_{t} = β_t ∘ m_{t-1} - η_t g_t and S_t = α_t ∘ S_{t-1} + m_t
every state of the chunk is

    S_n = Γ_n ∘ S_e + c_n ∘ m_e - Σ_s X[n, s] ∘ η_s e_s k_sᵀ,      X = Dα·Dβ,  c = Dα·(β_0⋯β_r),

the same algebra as the input-side map of an MLP memory (``mlp_memory.chunked``, whose state-independent
coefficients, block schedule and layout this module reuses): the matrix memory is that map with u = e and
no activation.  The state is carried stacked, [S | m] (B,H,dv,2dk), so each read of S and m together is one
product and each block's end one in-place ``baddbmm``.

Scope: chunks C ≥ 2 (at C = 1 an "l2" gradient depends on the previous token's state: a coupled
recurrence, left to the scan), any objective, retention and momentum per head or per channel, every read
and gradient mode; not with an output map or a windowed objective, and not with "decay before".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..mlp_memory.chunked import GROUP_TOKENS, _block_major, _masked, _Pre, _prepare, _schedule, _where_rows
from ..mlp_memory.state import MLPMemoryConfig
from .state import (
    MatrixMemoryConfig,
    MatrixMemoryState,
    init_rows,
    objective_residual,
    safe_log_retain,
    truncation_mask,
)


def has_momentum_form(
    cfg: MatrixMemoryConfig, retain: Tensor, momentum: Tensor | None, state: MatrixMemoryState
) -> bool:
    """Whether ``chunked_momentum`` applies (see the module docstring for the scope)."""
    if cfg.optimizer != "momentum_gd" or momentum is None or cfg.chunk < 2 or cfg.decay != "after":
        return False
    if cfg.residual or cfg.norm or cfg.window > 1:
        return False
    return retain.dim() in (3, 4) and momentum.dim() in (3, 4) and (retain.dim() == 4 or state.log_decay.dim() == 2)


def _step(
    Ss: Tensor, P: Tensor, pre: _Pre, cfg: MatrixMemoryConfig, stop_delta: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One segment linearised at P, entering with [S | m]: the reads (B,H,L,dv) and [S | m] after it."""
    d = pre.k.shape[-1]
    e = (
        -pre.v
        if cfg.objective == "dot"
        else objective_residual(pre.k @ P.transpose(-1, -2) - pre.v, cfg.objective, cfg.p, cfg.delta)
    )
    if pre.qs is None or pre.scores is None:  # boundary read
        o = pre.q @ (P if stop_delta is None else P + stop_delta).transpose(-1, -2)
    else:
        o = torch.baddbmm((pre.scores @ e).flatten(0, 1), pre.qs.flatten(0, 1), Ss.flatten(0, 1).transpose(-1, -2))
        o = o.view(*e.shape[:3], -1)
        if stop_delta is not None:
            o = o + pre.q @ stop_delta.transpose(-1, -2)
    base = Ss * pre.scale[..., None, :]
    if pre.carry_end is not None:
        base[..., :d] += pre.carry_end[..., None, :] * Ss[..., d:]
    base.flatten(0, 1).baddbmm_(e.flatten(0, 1).transpose(-1, -2), pre.right.flatten(0, 1))
    return o, base


def _end_log_decay(state: MatrixMemoryState, log_a: Tensor, valid: Tensor, cfg: MatrixMemoryConfig) -> Tensor:
    """Σ log α from each row's current chunk start to its last token (the carried sum if no chunk opened)."""
    steps = valid.shape[1]
    position = torch.arange(steps, device=valid.device)
    starts = ((state.phase[:, None] + position) % cfg.chunk == 0) & valid
    last = torch.where(starts, position, -1).amax(1)  # (B,): the last chunk start of the call, or -1
    counted = valid & (position[None, :] >= last[:, None])
    carried = state.log_decay
    if log_a.dim() == 4 and carried.dim() == 2:
        carried = carried[..., None].expand(*log_a.shape[:2], log_a.shape[3])
    mask = counted[:, None, :, None] if log_a.dim() == 4 else counted[:, None, :]
    total = torch.where(mask, log_a, torch.zeros_like(log_a)).sum(2)
    opened = (last >= 0).view(-1, *([1] * (total.dim() - 1)))
    return torch.where(opened, total, carried + total)


def chunked_momentum(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    state: MatrixMemoryState,
    cfg: MatrixMemoryConfig,
    lengths: Tensor | None,
    momentum: Tensor,
) -> tuple[Tensor, MatrixMemoryState]:
    """Same contract as ``reference.scan`` for the scope of ``has_momentum_form``."""
    batch, _, steps, d = q.shape
    if steps == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state
    chunk = cfg.chunk
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=q.device)
    valid = torch.arange(steps, device=q.device)[None, :] < lengths[:, None]
    carry, stop_delta = state, None
    if cfg.grad == "stop":
        k, v, lr, retain, momentum = k.detach(), v.detach(), lr.detach(), retain.detach(), momentum.detach()
        carry = MatrixMemoryState(
            state.S.detach(),
            state.P.detach(),
            state.log_decay.detach(),
            state.phase,
            state.chunks_done,
            state.init,
            state.momentum.detach(),
        )
        start = init_rows(state.init, batch)
        stop_delta = start - start.detach()
    cuts = truncation_mask(state.phase, state.chunks_done, cfg, steps) & valid if cfg.grad == "truncate" else None
    blocks = -(-steps // chunk)
    plan = _schedule(state.phase, state.chunks_done, valid, cuts, blocks, chunk)
    has_a = plan.stage_a.view(blocks, batch, chunk).any(2).any(1).tolist()
    any_open, all_open = plan.opens.any(1).tolist(), plan.opens.all(1).tolist()
    full_b = plan.stage_b.view(blocks, batch * chunk).all(1).tolist()
    cut_any = plan.cut.any(1).tolist() if plan.cut is not None else [False] * blocks

    log_a, log_b = safe_log_retain(retain), safe_log_retain(momentum)
    qb, kb, vb, lrb, lab, lbb = (_block_major(x, blocks, chunk) for x in (q, k, v, lr, log_a, log_b))
    shape = MLPMemoryConfig(read=cfg.read, optimizer="momentum_gd")  # what ``_prepare`` reads of the level

    group = max(1, GROUP_TOKENS // chunk)
    grouped = [x.split(group * batch) for x in (qb, kb, vb, lrb, lab, lbb)]  # one split: see _Pre.blocks

    def prepare(index: int, active: Tensor) -> list[_Pre]:
        act = active.split(group * batch)[index]
        qg, kg, vg, lrg, lag, lbg = (x[index] for x in grouped)
        pre = _prepare(qg, kg, vg, _masked(act, lrg), _masked(act, lag), _masked(act, lbg), act, shape)
        return pre.blocks(batch)

    Ss = torch.cat([carry.S, carry.momentum], -1)
    P = carry.P
    outputs = []
    for g0 in range(0, blocks, group):
        g1 = min(blocks, g0 + group)
        rows = slice(g0 * batch, g1 * batch)
        pre_b = prepare(g0 // group, plan.stage_b)
        pre_a = prepare(g0 // group, plan.stage_a) if any(has_a[g0:g1]) else None
        for n in range(g0, g1):
            mine = slice((n - g0) * batch, (n - g0 + 1) * batch)
            out = None if full_b[n] else q.new_zeros(batch, q.shape[1], chunk, v.shape[-1])
            if has_a[n] and pre_a is not None and out is not None:
                out_a, Ss = _step(Ss, P, pre_a[n - g0], cfg, stop_delta)
                out = torch.where(plan.stage_a[rows][mine][:, None, :, None], out_a, out)
            if any_open[n]:
                if plan.cut is not None and cut_any[n]:
                    Ss, P = _where_rows(plan.cut[n], (Ss.detach(), P.detach()), (Ss, P))
                P = Ss[..., :d] if all_open[n] else _where_rows(plan.opens[n], (Ss[..., :d],), (P,))[0]
                out_b, Ss = _step(Ss, P, pre_b[n - g0], cfg, stop_delta)
                out = out_b if out is None else torch.where(plan.stage_b[rows][mine][:, None, :, None], out_b, out)
            assert out is not None
            outputs.append(out)

    o = torch.cat(outputs, dim=2)[:, :, :steps]
    S, m, P = Ss[..., :d].contiguous(), Ss[..., d:].contiguous(), P.contiguous()
    log_decay = _end_log_decay(carry, log_a, valid, cfg)
    if stop_delta is not None:
        S, P, log_decay = S + stop_delta, P + stop_delta, log_decay.detach()
    o = torch.where(valid[:, None, :, None], o, torch.zeros_like(o))
    new_state = MatrixMemoryState(S, P, log_decay, plan.phase, plan.done, state.init, m)
    return o, new_state

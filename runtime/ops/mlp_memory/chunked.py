"""Chunk-parallel (dual form) implementation of an MLP-memory level.

Inside a chunk every g_t is taken at the chunk-start state θ⁰ = θ_{b-1}, so all of them are computed
at once, and each is a sum of rank-one terms: g1_s = δ_s s_sᵀ, g2_s = u_s k_sᵀ (``token_gradients``).
With "gd" / "momentum_gd" and per-head rates, every state inside the chunk is

    θ_n = Γ_n θ_e + c_n m_e - Σ_s X[n, s] η_s g_s          (n = state index, 0 = entering state θ_e)

with Γ the cumulative retention, X = Dα (gd) or Dα·Dβ (momentum: Dα[n, r] = Γ_n/Γ_{r+1},
Dβ[r, s] = β_{s+1}⋯β_r) and c = Dα·(β_0⋯β_r).  Reads then never materialise per-token weights:

    W2_τ q = Γ_τ W2_e q + c_τ M2_e q - Σ_s X[τ, s] η_s (k_s·q) u_s,      p = σ(W2_τ q),
    W1_τ p = Γ_τ W1_e p + c_τ M1_e p - Σ_s X[τ, s] η_s (s_s·p) δ_s,      o = q + W1_τ p (or LN).

The loop runs over blocks of C tokens (chunks are sequential: each linearises at the previous
one's end).  Rows may have different phases (streaming, packing): a block then holds the tail of
a row's carried chunk (stage A, linearised at the carried P) and the head of its next chunk
(stage B, linearised at the state where it starts), each computed in parallel with masks.

Scope of the parallel form: "gd" and "momentum_gd" with per-head (B,H,T) α and β.  "dgd" (its
factor on W2 makes the states a product of rank-one factors) and per-channel rates run through
``_scan_fallback``, the documented compiled-scan fallback (DESIGN §3): the reference recurrence
behind the same API.  At C = 1 the block loop is itself a per-token scan (DESIGN §3: an MLP memory
updated every token has no parallel form).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .state import (
    MLPMemoryConfig,
    MLPMemoryState,
    activation,
    init_rows,
    output_map,
    safe_log,
    token_gradients,
    truncation_mask,
)


def has_parallel_form(cfg: MLPMemoryConfig, retain: Tensor, momentum: Tensor | None) -> bool:
    """Whether ``chunked`` runs the chunk-parallel form (True) or the scan fallback (False)."""
    if cfg.optimizer == "dgd" or retain.dim() != 3:
        return False
    return cfg.optimizer != "momentum_gd" or (momentum is not None and momentum.dim() == 3)


def _scan_fallback(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    state: MLPMemoryState,
    cfg: MLPMemoryConfig,
    lengths: Tensor | None,
    momentum: Tensor | None,
) -> tuple[Tensor, MLPMemoryState]:
    """The compiled-scan fallback (DESIGN §3): the per-token reference recurrence."""
    return reference.scan(q, k, v, lr, retain, state, cfg, lengths=lengths, momentum=momentum)


def _lower_ratio(log_hi: Tensor, log_lo: Tensor, mask: Tensor) -> Tensor:
    """exp(log_hi[n] - log_lo[r]) where mask[n, r] else 0: (B,H,N), (B,H,R), mask (B or 1,N,R) -> (B,H,N,R)."""
    diff = log_hi[..., :, None] - log_lo[..., None, :]
    return torch.where(mask[:, None], diff, float("-inf")).exp()


def _segment(
    enter: tuple[Tensor, Tensor, Tensor, Tensor],
    lin: tuple[Tensor, Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    log_a: Tensor,
    log_b: Tensor | None,
    active: Tensor,
    cfg: MLPMemoryConfig,
    stop_delta: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The tokens of a block marked ``active`` (B,L) as one piece of a chunk linearised at ``lin``.

    enter: (W1, W2, M1, M2) entering the block; inactive tokens are no-ops (η = 0, α = β = 1).
    Returns the outputs (B,H,L,d) (meaningful at active tokens) and (W1, W2, M1, M2) after the block.
    """
    W1e, W2e, M1e, M2e = enter
    length = q.shape[2]
    delta, s, u = token_gradients(lin[0], lin[1], k, v, cfg)
    G = torch.nn.functional.pad(log_a.cumsum(-1), (1, 0))  # log Γ at state indices 0..L
    states = torch.arange(length + 1, device=q.device)
    tokens = torch.arange(length, device=q.device)
    # Dα[n, r]: token r (entering at state r+1) is part of state n, decayed by α_{r+1}⋯α_{n-1}.
    d_alpha = _lower_ratio(G, G[..., 1:], (tokens[None, :] < states[:, None])[None] & active[:, None, :])
    if log_b is None:
        mix = d_alpha
        carry_coef = None
    else:
        Bc = log_b.cumsum(-1)  # log β_0⋯β_r
        d_beta = _lower_ratio(Bc, Bc, (tokens[None, :] <= tokens[:, None])[None])
        mix = d_alpha @ d_beta
        carry_coef = d_alpha @ Bc.exp()[..., None]  # (B,H,L+1,1)
    weight = mix * lr[..., None, :]  # X[n, s] η_s

    if cfg.read == "boundary":
        W1r, W2r = lin
        if stop_delta is not None:
            W1r, W2r = W1r + stop_delta[0], W2r + stop_delta[1]
        pre = q @ W2r.transpose(-1, -2)
        p = activation(pre)
        z = p @ W1r.transpose(-1, -2)
    else:
        tau = tokens + 1 if cfg.read == "online" else tokens
        w_tau = weight[..., tau, :]  # (B,H,L,L)
        gamma = G[..., tau].exp()[..., None]
        pre = gamma * (q @ W2e.transpose(-1, -2)) - (w_tau * (q @ k.transpose(-1, -2))) @ u
        if carry_coef is not None:
            pre = pre + carry_coef[..., tau, :] * (q @ M2e.transpose(-1, -2))
        if stop_delta is not None:
            pre = pre + q @ stop_delta[1].transpose(-1, -2)
        p = activation(pre)
        z = gamma * (p @ W1e.transpose(-1, -2)) - (w_tau * (p @ s.transpose(-1, -2))) @ delta
        if carry_coef is not None:
            z = z + carry_coef[..., tau, :] * (p @ M1e.transpose(-1, -2))
        if stop_delta is not None:
            z = z + p @ stop_delta[0].transpose(-1, -2)
    out = q + output_map(z, cfg)

    # The state after the block (index L).
    w_end = weight[..., length, :]  # (B,H,L)
    gamma_end = G[..., length].exp()[..., None, None]
    W1 = gamma_end * W1e - (w_end[..., None] * delta).transpose(-1, -2) @ s
    W2 = gamma_end * W2e - (w_end[..., None] * u).transpose(-1, -2) @ k
    M1, M2 = M1e, M2e
    if log_b is not None and carry_coef is not None:
        Bc = log_b.cumsum(-1)
        c_end = carry_coef[..., length, :, None]
        W1, W2 = W1 + c_end * M1e, W2 + c_end * M2e
        # m after the block: β_0⋯β_{L-1} m_e - Σ_s (β_{s+1}⋯β_{L-1}) η_s g_s.
        b_end = (Bc[..., -1:] - Bc).exp() * lr  # (B,H,L)
        beta_all = Bc[..., -1].exp()[..., None, None]
        M1 = beta_all * M1e - (b_end[..., None] * delta).transpose(-1, -2) @ s
        M2 = beta_all * M2e - (b_end[..., None] * u).transpose(-1, -2) @ k
    return out, (W1, W2, M1, M2)


def _where_rows(rows: Tensor, a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    mask = rows.view(-1, 1, 1, 1)
    return tuple(torch.where(mask, x, y) for x, y in zip(a, b))


def chunked(
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
    """Same contract as ``reference.scan``, parallel inside each chunk (see the module docstring)."""
    if not has_parallel_form(cfg, retain, momentum):
        return _scan_fallback(q, k, v, lr, retain, state, cfg, lengths, momentum)
    batch, _, steps, _ = q.shape
    device = q.device
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=device)
    valid = torch.arange(steps, device=device)[None, :] < lengths[:, None]
    use_momentum = cfg.optimizer == "momentum_gd"

    stop = cfg.grad == "stop"
    carry = state
    stop_delta = None
    if stop:
        k, v, lr, retain = k.detach(), v.detach(), lr.detach(), retain.detach()
        momentum = None if momentum is None else momentum.detach()
        carry = state.detach()
        start1, start2 = init_rows(state.init1, batch), init_rows(state.init2, batch)
        stop_delta = (start1 - start1.detach(), start2 - start2.detach())
    lr = torch.where(valid[:, None], lr, torch.zeros_like(lr))
    log_a = torch.where(valid[:, None], safe_log(retain), torch.zeros_like(retain))
    log_b = None
    if use_momentum and momentum is not None:
        log_b = torch.where(valid[:, None], safe_log(momentum), torch.zeros_like(momentum))
    cuts = truncation_mask(state.phase, state.chunks_done, cfg, steps) & valid if cfg.grad == "truncate" else None

    W1, W2, P1, P2, M1, M2 = carry.tensors()
    phase, done = carry.phase, carry.chunks_done
    outputs = []
    for pos in range(0, steps, cfg.chunk):
        end = min(pos + cfg.chunk, steps)
        length = end - pos
        local = torch.arange(length, device=device)
        # Local index of the (at most one) chunk start in this block, per row.
        first = (cfg.chunk - phase) % cfg.chunk
        live = valid[:, pos:end]
        stage_a = live & (local[None, :] < first[:, None])
        stage_b = live & (local[None, :] >= first[:, None])
        sl = slice(pos, end)

        def run(
            enter: tuple[Tensor, Tensor, Tensor, Tensor], lin: tuple[Tensor, Tensor], active: Tensor, sl: slice = sl
        ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
            mask = active[:, None]
            return _segment(
                enter,
                lin,
                q[:, :, sl],
                k[:, :, sl],
                v[:, :, sl],
                torch.where(mask, lr[:, :, sl], torch.zeros_like(lr[:, :, sl])),
                torch.where(mask, log_a[:, :, sl], torch.zeros_like(log_a[:, :, sl])),
                None if log_b is None else torch.where(mask, log_b[:, :, sl], torch.zeros_like(log_b[:, :, sl])),
                active,
                cfg,
                stop_delta,
            )

        out = q.new_zeros(q[:, :, sl].shape)
        if bool(stage_a.any()):
            out_a, (W1, W2, M1, M2) = run((W1, W2, M1, M2), (P1, P2), stage_a)
            out = torch.where(stage_a[:, None, :, None], out_a, out)
        opens = stage_b.any(1)
        if bool(opens.any()):
            if cuts is not None:
                cut = cuts[:, sl].gather(1, first.clamp_max(length - 1)[:, None])[:, 0] & opens
                W1, W2, M1, M2 = _where_rows(
                    cut, (W1.detach(), W2.detach(), M1.detach(), M2.detach()), (W1, W2, M1, M2)
                )
            P1, P2 = _where_rows(opens, (W1, W2), (P1, P2))
            out_b, (W1, W2, M1, M2) = run((W1, W2, M1, M2), (P1, P2), stage_b)
            out = torch.where(stage_b[:, None, :, None], out_b, out)
        outputs.append(out)
        offset = phase + live.sum(1)
        phase, done = offset % cfg.chunk, done + offset // cfg.chunk

    o = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape)
    if stop_delta is not None:
        W1, W2 = W1 + stop_delta[0], W2 + stop_delta[1]
        P1, P2 = P1 + stop_delta[0], P2 + stop_delta[1]
    o = torch.where(valid[:, None, :, None], o, torch.zeros_like(o))
    new_state = MLPMemoryState(W1, W2, P1, P2, phase, done, state.init1, state.init2, M1, M2)
    return o, new_state

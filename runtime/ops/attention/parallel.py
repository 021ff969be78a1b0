"""Whole-call implementation of a `kv` memory level (the fast path).

All T tokens of a call are read at once with ``torch.nn.functional.scaled_dot_product_attention``
over the keys [persistent (P) ‖ carried cache (N) ‖ this call's tokens (T)], with an explicit
boolean mask (B,1,T,P+N+T) that encodes, from document positions (see ``state.py``):

    persistent columns: always visible;
    cache slot / call token s for the query at t: s is a real token (slot < length, or s < lengths)
        and causal (t − s ≥ 0 "online", ≥ 1 "before"), inside the window (t − s < W "online",
        ≤ W "before") and in t's segment (⌊s/S⌋ = ⌊t/S⌋).

Because the carried cache is prepended with its true positions, feeding a stream in pieces gives the
same outputs and final state as one call.  Queries that see no key (padding, or a `before` read of
an empty cache without persistent memory) are pointed at their own column, so no softmax row is
empty (some fused kernels return NaN there), and their output is then set to 0 (zero gradient).
The carried state after the call keeps the tokens an `online` read at the last consumed token sees,
compacted left in position order (the layout of ``state.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .state import AttentionConfig, AttentionState


def _visible(cfg: AttentionConfig, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """(B,T,M) bool rule of ``state.py`` for query positions (B,T) and key positions (B,M)."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    online = cfg.read == "online"
    ok = d >= 0 if online else d >= 1
    if cfg.window is not None:
        ok = ok & (d < cfg.window if online else d <= cfg.window)
    if cfg.segment is not None:
        ok = ok & (q_pos[:, :, None] // cfg.segment == k_pos[:, None, :] // cfg.segment)
    return ok


def _carry(
    state: AttentionState, k: Tensor, v: Tensor, pos: Tensor, real: Tensor, new_position: Tensor, cfg: AttentionConfig
) -> AttentionState:
    """Keep the real tokens of [cache ‖ call] that an `online` read at the last consumed token sees."""
    last = new_position - 1
    keep = real & (pos <= last[:, None])
    if cfg.window is not None:
        keep = keep & (pos > last[:, None] - cfg.window)
    if cfg.segment is not None:
        keep = keep & (pos // cfg.segment == last[:, None] // cfg.segment)
    length = keep.sum(-1)
    capacity = int(length.max().item()) if keep.shape[0] else 0
    # Kept tokens are contiguous in position and already in column order: a stable sort packs them left.
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :capacity]
    filled = torch.arange(capacity, device=pos.device)[None, :] < length[:, None]
    batch, heads = k.shape[:2]

    def pack(x: Tensor) -> Tensor:
        index = order[:, None, :, None].expand(batch, heads, capacity, x.shape[-1])
        picked = x.gather(2, index)
        return torch.where(filled[:, None, :, None], picked, torch.zeros_like(picked))

    return AttentionState(pack(k), pack(v), length, new_position, state.persistent_keys, state.persistent_values)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: AttentionState,
    cfg: AttentionConfig,
    lengths: Tensor | None = None,
) -> tuple[Tensor, AttentionState]:
    """Same contract as ``reference.scan``, computed for the whole call at once.

    q, k: (B,H,T,dk); v: (B,H,T,dv); lengths: (B,) int64 valid lengths or None.
    Returns o (B,H,T,dv) and the state after each row's last valid token.
    """
    batch, _, steps, dk = q.shape
    device = q.device
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=device)
    local = torch.arange(steps, device=device)
    valid = local[None, :] < lengths[:, None]  # (B,T)
    q_pos = state.position[:, None] + local  # (B,T)

    # Keys: the carried cache then this call's tokens, with positions and realness.
    k_all = torch.cat([state.keys, k], dim=2)
    v_all = torch.cat([state.values, v], dim=2)
    pos_all = torch.cat([state.slot_positions(), q_pos], dim=1)
    real_all = torch.cat([state.slot_valid(), valid], dim=1)
    mask = _visible(cfg, q_pos, pos_all) & real_all[:, None, :] & valid[:, :, None]

    keys, values = k_all, v_all
    persistent = state.persistent_rows()
    if persistent is not None:
        keys = torch.cat([persistent[0], keys], dim=2)
        values = torch.cat([persistent[1], values], dim=2)
        always = valid[:, :, None].expand(batch, steps, state.persistent_count)
        mask = torch.cat([always, mask], dim=2)

    seen = mask.any(-1)  # (B,T)
    own = torch.zeros_like(mask)
    own[:, local, keys.shape[2] - steps + local] = True
    mask = mask | (own & ~seen[:, :, None])

    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=cfg.score_scale(dk))
    o = torch.where(seen[:, None, :, None], o, torch.zeros_like(o))
    new_state = _carry(state, k_all, v_all, pos_all, real_all, state.position + lengths, cfg)
    return o, new_state

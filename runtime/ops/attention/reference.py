"""Per-token reference implementation of a `kv` memory level (the oracle).

One token t of every row, literally as the semantics read (see ``state.py``):

    1. segment start (t mod S = 0): the cache is cleared (the persistent memory stays);
    2. read "before": o_t = softmax(scale · K qₜ) V over [persistent ‖ cache θ_{t−1}];
    3. append (k_t, v_t) to the cache; with a window W, evict the oldest token if it then holds W + 1;
    4. read "online": the same attention over [persistent ‖ cache θ_t].

An empty set of keys reads 0.  Padding tokens (valid = False) leave the state untouched and output 0.
The softmax is written out here (no scaled_dot_product_attention), so the fast path in
``parallel.py`` is checked against an independent computation.  Written for clarity: it loops over
tokens and shifts the cache by one slot on eviction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .state import AttentionConfig, AttentionState


def _softmax_read(q_t: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scale: float) -> Tensor:
    """Σ_m softmax_m(scale k_m·q) v_m over the visible entries; 0 where none is visible.

    q_t: (B,H,dk); keys: (B,H,M,dk); values: (B,H,M,dv); visible: (B,M) bool.
    """
    if keys.shape[2] == 0:
        return q_t.new_zeros(*q_t.shape[:2], values.shape[-1])
    scores = torch.einsum("bhmk,bhk->bhm", keys, q_t) * scale
    mask = visible[:, None, :].expand_as(scores)
    top = torch.where(mask, scores, float("-inf")).amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    # Masked scores are replaced before exp, so neither the value nor the gradient can be inf/NaN.
    weights = torch.where(mask, torch.exp(torch.where(mask, scores, top) - top), torch.zeros_like(scores))
    total = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    return torch.einsum("bhm,bhmv->bhv", probs, values)


def _read(state: AttentionState, q_t: Tensor, cfg: AttentionConfig) -> Tensor:
    keys, values, visible = state.keys, state.values, state.slot_valid()
    persistent = state.persistent_rows()
    if persistent is not None:
        keys = torch.cat([persistent[0], keys], dim=2)
        values = torch.cat([persistent[1], values], dim=2)
        always = torch.ones(state.batch, state.persistent_count, dtype=torch.bool, device=visible.device)
        visible = torch.cat([always, visible], dim=1)
    return _softmax_read(q_t, keys, values, visible, cfg.score_scale(q_t.shape[-1]))


def step(
    state: AttentionState,
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    cfg: AttentionConfig,
    valid_t: Tensor | None = None,
) -> tuple[Tensor, AttentionState]:
    """Process one token for all rows.

    q_t, k_t: (B,H,dk); v_t: (B,H,dv); valid_t: (B,) bool or None.
    Returns o_t (B,H,dv) and the state after the token.
    """
    batch = q_t.shape[0]
    valid = valid_t if valid_t is not None else torch.ones(batch, dtype=torch.bool, device=q_t.device)
    keys, values, length = state.keys, state.values, state.length

    # 1. A segment start clears the cache.
    if cfg.segment is not None:
        reset = valid & (state.position % cfg.segment == 0)
        keys = torch.where(reset.view(-1, 1, 1, 1), torch.zeros_like(keys), keys)
        values = torch.where(reset.view(-1, 1, 1, 1), torch.zeros_like(values), values)
        length = torch.where(reset, torch.zeros_like(length), length)
    entering = AttentionState(keys, values, length, state.position, state.persistent_keys, state.persistent_values)

    # 3. Append at slot `length` (growing the cache tensor by one slot when a row is full).
    if keys.shape[2] == 0 or bool((length >= keys.shape[2]).any()):
        keys = torch.nn.functional.pad(keys, (0, 0, 0, 1))
        values = torch.nn.functional.pad(values, (0, 0, 0, 1))
    slots = torch.arange(keys.shape[2], device=keys.device)
    here = ((slots[None, :] == length[:, None]) & valid[:, None])[:, None, :, None]
    keys = torch.where(here, k_t[:, :, None, :], keys)
    values = torch.where(here, v_t[:, :, None, :], values)
    length = length + valid.long()
    if cfg.window is not None:
        # Evict the oldest token: shift the row left by one slot.
        over = (length > cfg.window).view(-1, 1, 1, 1)
        keys = torch.where(over, torch.nn.functional.pad(keys[:, :, 1:], (0, 0, 0, 1)), keys)
        values = torch.where(over, torch.nn.functional.pad(values[:, :, 1:], (0, 0, 0, 1)), values)
        length = length.clamp_max(cfg.window)
        keys, values = keys[:, :, : cfg.window], values[:, :, : cfg.window]
    new_state = AttentionState(
        keys, values, length, state.position + valid.long(), state.persistent_keys, state.persistent_values
    )

    # 2. / 4. The read.
    o_t = _read(entering if cfg.read == "before" else new_state, q_t, cfg)
    o_t = torch.where(valid[:, None, None], o_t, torch.zeros_like(o_t))
    return o_t, new_state


def scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: AttentionState,
    cfg: AttentionConfig,
    lengths: Tensor | None = None,
) -> tuple[Tensor, AttentionState]:
    """Loop ``step`` over the T tokens.

    q, k: (B,H,T,dk); v: (B,H,T,dv); lengths: (B,) int64 valid lengths or None.
    Returns o (B,H,T,dv) and the state after each row's last valid token.
    """
    outputs = []
    for t in range(q.shape[2]):
        valid_t = None if lengths is None else lengths > t
        o_t, state = step(state, q[:, :, t], k[:, :, t], v[:, :, t], cfg, valid_t)
        outputs.append(o_t)
    if not outputs:
        return q.new_zeros(*q.shape[:2], 0, v.shape[-1]), state
    return torch.stack(outputs, dim=2), state

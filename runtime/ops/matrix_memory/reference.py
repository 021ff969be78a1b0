"""Per-token reference implementation of a matrix-memory level (the oracle).

For token t in the chunk starting at b (b a multiple of C from the document start):

    P_t = S_{b-1}                         (decay "after")
    P_t = (α_b ⋯ α_t) · S_{b-1}           (decay "before")
    g_t = (P_t k_t - v_t) k_tᵀ            (objective "l2")
    g_t = -v_t k_tᵀ                       (objective "dot")
    S_t = α_t S_{t-1} - η_t g_t
    o_t = S_τ q_t,   τ = t ("online"), t-1 ("before"), b-1 ("boundary")

Outer-gradient modes only change autograd: "stop" replaces every state by θ_init + sg(θ - θ_init)
(and detaches the carried log_decay, so no gradient reaches k, v, η, α through the state);
"truncate" detaches the state just before every chunk start b > 0 with (b / C) mod k = 0.
Padding tokens (valid = False) leave the state untouched and output 0.

This module is written for clarity, not speed: it loops over tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .state import MatrixMemoryConfig, MatrixMemoryState, safe_log_retain, stop_gradient


def _entering_state(state: MatrixMemoryState, cfg: MatrixMemoryConfig, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(S, P) as seen by the token about to be processed, with the outer-gradient mode applied.

    "stop": every state is θ_init + sg(θ - θ_init).  "truncate": at a chunk start b > 0 with
    (b / C) mod k = 0 the whole state is detached, for the rows where the token is real.
    """
    S, P = state.S, state.P
    if cfg.grad == "stop":
        return stop_gradient(S, state.init), stop_gradient(P, state.init)
    if cfg.grad == "truncate":
        starting = state.phase == 0
        done = state.chunks_done
        cut = (starting & (done > 0) & (done % cfg.truncate_k == 0) & valid).view(-1, 1, 1, 1)
        S = torch.where(cut, S.detach(), S)
        P = torch.where(cut, P.detach(), P)
    return S, P


def _inner_gradient(lin: Tensor, k_t: Tensor, v_t: Tensor, objective: str) -> Tensor:
    """g = (P k - v) kᵀ for "l2", g = -v kᵀ for "dot"; shapes (B,H,dv,dk)."""
    if objective == "l2":
        residual = torch.einsum("bhvk,bhk->bhv", lin, k_t) - v_t
    else:
        residual = -v_t
    return residual[..., :, None] * k_t[..., None, :]


def step(
    state: MatrixMemoryState,
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    lr_t: Tensor,
    retain_t: Tensor,
    cfg: MatrixMemoryConfig,
    valid_t: Tensor | None = None,
) -> tuple[Tensor, MatrixMemoryState]:
    """Process one token for all rows.

    q_t, k_t: (B,H,dk); v_t: (B,H,dv); lr_t, retain_t: (B,H); valid_t: (B,) bool or None.
    Returns o_t (B,H,dv) and the state after the token.
    """
    batch = q_t.shape[0]
    valid = valid_t if valid_t is not None else torch.ones(batch, dtype=torch.bool, device=q_t.device)
    S, P_in = _entering_state(state, cfg, valid)

    # A token at phase 0 opens a chunk: its linearisation base is the state just before it.
    starting = state.phase == 0
    P = torch.where(starting.view(-1, 1, 1, 1), S, P_in)
    log_decay = torch.where(starting[:, None], torch.zeros_like(state.log_decay), state.log_decay)
    log_decay = log_decay + safe_log_retain(retain_t)

    lin = P if cfg.decay == "after" else torch.exp(log_decay)[..., None, None] * P
    grad = _inner_gradient(lin, k_t, v_t, cfg.objective)
    S_new = retain_t[..., None, None] * S - lr_t[..., None, None] * grad
    if cfg.grad == "stop":
        S_new = stop_gradient(S_new, state.init)
        # The carried decay is state too: under "stop" no gradient reaches α through it.
        log_decay = log_decay.detach()

    read_from = {"online": S_new, "before": S, "boundary": P}[cfg.read]
    o_t = torch.einsum("bhvk,bhk->bhv", read_from, q_t)

    phase = state.phase + 1
    finished = phase == cfg.chunk
    keep = valid.view(-1, 1, 1, 1)
    # Padding leaves the incoming state untouched (truncation never cuts padded rows, so S and
    # P_in equal the carried state there, up to the "stop" re-parametrisation).
    new_state = MatrixMemoryState(
        S=torch.where(keep, S_new, S),
        P=torch.where(keep, P, P_in),
        log_decay=torch.where(valid[:, None], log_decay, state.log_decay),
        phase=torch.where(valid, torch.where(finished, 0, phase), state.phase),
        chunks_done=torch.where(valid, state.chunks_done + finished.long(), state.chunks_done),
        init=state.init,
    )
    o_t = torch.where(valid[:, None, None], o_t, torch.zeros_like(o_t))
    return o_t, new_state


def scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    state: MatrixMemoryState,
    cfg: MatrixMemoryConfig,
    lengths: Tensor | None = None,
) -> tuple[Tensor, MatrixMemoryState]:
    """Loop ``step`` over the T tokens.

    q, k: (B,H,T,dk); v: (B,H,T,dv); lr, retain: (B,H,T); lengths: (B,) int64 valid lengths or None.
    Returns o (B,H,T,dv) and the state after each row's last valid token.
    """
    steps = q.shape[2]
    outputs = []
    for t in range(steps):
        valid_t = None if lengths is None else lengths > t
        o_t, state = step(state, q[:, :, t], k[:, :, t], v[:, :, t], lr[:, :, t], retain[:, :, t], cfg, valid_t)
        outputs.append(o_t)
    if not outputs:
        return q.new_zeros(*q.shape[:2], 0, v.shape[-1]), state
    return torch.stack(outputs, dim=2), state

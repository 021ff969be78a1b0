"""Per-token reference implementation of a matrix-memory level (the oracle).

For token t in the chunk starting at b (b a multiple of C from the document start):

    P_t = S_{b-1}                         (decay "after")
    P_t = (α_b ⋯ α_t) · S_{b-1}           (decay "before")
    r_t = P_t k_t - v_t                   (the residual)
    g_t = r_t k_tᵀ                        (objective "l2", ℓ = ½‖r‖²)
    g_t = -v_t k_tᵀ                       (objective "dot")
    g_t = (sign(r_t) ⊙ |r_t|^{p-1}) k_tᵀ  (objective "lp", ℓ = (1/p) Σ_i |r_i|^p)
    g_t = clamp(r_t, -δ, δ) k_tᵀ          (objective "huber", ℓ = Σ_i ½r_i² if |r_i| ≤ δ else δ(|r_i| - ½δ))
    S_t = α_t S_{t-1} - η_t g_t                        (optimizer "gd")
    m_t = β_t m_{t-1} - η_t g_t,  S_t = α_t S_{t-1} + m_t  (optimizer "momentum_gd", Titans Eq. 13-14)
    S_t = S_{t-1} (α_t I - η_t k_t k_tᵀ) - η_t g_t      (optimizer "dgd", Eq. 88)
    m_t = β_t m_{t-1} + g_t,  S_t = α_t S_{t-1} - η_t NS_steps(m_t)   (optimizer "newton_schulz", Eq. 42/52;
                                                          β = 0 when no momentum rate is given)
    m_t = m_{t-1} (α_t I - λ ĝ_tᵀ ĝ_t) - η_t g_t,  S_t = S_{t-1} + m_t,  ĝ = g / (‖g‖_F + ε)
                                                        (optimizer "delta_momentum", Eq. 48-49)
    o_t = S_τ q_t,   τ = t ("online"), t-1 ("before"), b-1 ("boundary")
    (with an output map o_t = M_{S_τ}(q_t) and g_t = δ_t k_tᵀ; with a window g_t sums the last c terms:
    ``runtime/ops/memory_maps.py``)

A retention α_t of shape (B,H,dk) is per channel and acts on the key axis: α_t S means S·diag(α_t)
(and α_b ⋯ α_t · S_{b-1} is S_{b-1}·diag(α_b ⊙ ⋯ ⊙ α_t)); the same holds for β_t on m.

Outer-gradient modes only change autograd: "stop" replaces every state by θ_init + sg(θ - θ_init)
(and detaches the carried log_decay, so no gradient reaches k, v, η, α through the state);
"truncate" detaches the state just before every chunk start b > 0 with (b / C) mod k = 0.
Padding tokens (valid = False) leave the state untouched and output 0.

This module is written for clarity, not speed: it loops over tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..memory_maps import gradient_signal, memory_output
from ..newton_schulz import newton_schulz
from .state import (
    MatrixMemoryConfig,
    MatrixMemoryState,
    normalised,
    objective_residual,
    safe_log_retain,
    scale_keys,
    stop_gradient,
)


def _rows(mask: Tensor, x: Tensor) -> Tensor:
    """A (B,) mask viewed to broadcast against x (B,...)."""
    return mask.view(-1, *([1] * (x.dim() - 1)))


def _entering_state(state: MatrixMemoryState, cfg: MatrixMemoryConfig, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(S, P, m) as seen by the token about to be processed, with the outer-gradient mode applied.

    "stop": every state is θ_init + sg(θ - θ_init) (the momentum starts at 0, so it is detached).
    "truncate": at a chunk start b > 0 with (b / C) mod k = 0 the whole state is detached, for the
    rows where the token is real.
    """
    S, P, m = state.S, state.P, state.momentum
    if cfg.grad == "stop":
        return stop_gradient(S, state.init), stop_gradient(P, state.init), m.detach()
    if cfg.grad == "truncate":
        starting = state.phase == 0
        done = state.chunks_done
        cut = (starting & (done > 0) & (done % cfg.truncate_k == 0) & valid).view(-1, 1, 1, 1)
        S = torch.where(cut, S.detach(), S)
        P = torch.where(cut, P.detach(), P)
        m = torch.where(cut, m.detach(), m)
    return S, P, m


def _inner_gradient(lin: Tensor, k_t: Tensor, v_t: Tensor, cfg: MatrixMemoryConfig) -> Tensor:
    """g = e kᵀ with e = -v ("dot") or e = objective_residual(P k - v); shapes (B,H,dv,dk).

    With an output map e is carried back through it (δ, ``memory_maps.gradient_signal``); with a window,
    k_t and v_t are (B,H,c,d) stacks and g = Σ_j e_j k_jᵀ."""
    keys = k_t if cfg.window > 1 else k_t[..., None, :]
    values = v_t if cfg.window > 1 else v_t[..., None, :]
    if cfg.residual or cfg.norm:
        signal = gradient_signal(
            keys @ lin.transpose(-1, -2), lambda y: _error(y, values, cfg), keys, cfg.residual, cfg.norm, cfg.ln_eps
        )
        return signal.transpose(-1, -2) @ keys
    if cfg.objective == "dot":
        residual = -values
    else:
        residual = objective_residual(keys @ lin.transpose(-1, -2) - values, cfg.objective, cfg.p, cfg.delta)
    return residual.transpose(-1, -2) @ keys


def _error(y: Tensor, v: Tensor, cfg: MatrixMemoryConfig) -> Tensor:
    """e = ∂ℓ/∂M(k) at the memory's output y = M(k)."""
    return -v if cfg.objective == "dot" else objective_residual(y - v, cfg.objective, cfg.p, cfg.delta)


def step(
    state: MatrixMemoryState,
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    lr_t: Tensor,
    retain_t: Tensor,
    cfg: MatrixMemoryConfig,
    valid_t: Tensor | None = None,
    momentum_t: Tensor | None = None,
) -> tuple[Tensor, MatrixMemoryState]:
    """Process one token for all rows.

    q_t, k_t: (B,H,dk); v_t: (B,H,dv); lr_t: (B,H); retain_t: (B,H) or (B,H,dk) per channel;
    valid_t: (B,) bool or None; momentum_t: β, (B,H) or (B,H,dk), required by "momentum_gd"
    (optional for "newton_schulz": None means β = 0).
    Returns o_t (B,H,dv) and the state after the token.
    """
    batch = q_t.shape[0]
    valid = valid_t if valid_t is not None else torch.ones(batch, dtype=torch.bool, device=q_t.device)
    S, P_in, m = _entering_state(state, cfg, valid)

    # A token at phase 0 opens a chunk: its linearisation base is the state just before it.
    starting = state.phase == 0
    P = torch.where(starting.view(-1, 1, 1, 1), S, P_in)
    carried_decay = state.log_decay
    if retain_t.dim() == 3 and carried_decay.dim() == 2:
        carried_decay = carried_decay[..., None].expand(*retain_t.shape)
    log_decay = torch.where(_rows(starting, carried_decay), torch.zeros_like(carried_decay), carried_decay)
    log_decay = log_decay + safe_log_retain(retain_t)

    lin = P if cfg.decay == "after" else scale_keys(P, torch.exp(log_decay))
    grad = _inner_gradient(lin, k_t, v_t, cfg)
    eta = lr_t[..., None, None]
    m_new = m
    if cfg.optimizer == "gd":
        S_new = scale_keys(S, retain_t) - eta * grad
    elif cfg.optimizer == "momentum_gd":
        if momentum_t is None:
            raise ValueError('optimizer "momentum_gd" needs the momentum rate β (momentum_t)')
        m_new = scale_keys(m, momentum_t) - eta * grad
        S_new = scale_keys(S, retain_t) + m_new
    elif cfg.optimizer == "newton_schulz":
        m_new = grad if momentum_t is None else scale_keys(m, momentum_t) + grad
        S_new = scale_keys(S, retain_t) - eta * newton_schulz(m_new, cfg.steps)
    elif cfg.optimizer == "delta_momentum":
        g_hat = normalised(grad, cfg.eps)
        m_new = scale_keys(m, retain_t) - cfg.lam * (m @ g_hat.transpose(-1, -2)) @ g_hat - eta * grad
        S_new = S + m_new
    else:  # dgd: S (α I - η k kᵀ) - η g
        S_k = torch.einsum("bhvk,bhk->bhv", S, k_t)
        S_new = scale_keys(S, retain_t) - eta * S_k[..., :, None] * k_t[..., None, :] - eta * grad
    if cfg.grad == "stop":
        S_new = stop_gradient(S_new, state.init)
        m_new = m_new.detach()
        # The carried decay is state too: under "stop" no gradient reaches α through it.
        log_decay = log_decay.detach()

    read_from = {"online": S_new, "before": S, "boundary": P}[cfg.read]
    o_t = torch.einsum("bhvk,bhk->bhv", read_from, q_t)
    if cfg.residual or cfg.norm:
        o_t = memory_output(o_t, q_t, cfg.residual, cfg.norm, cfg.ln_eps)

    phase = state.phase + 1
    finished = phase == cfg.chunk
    keep = valid.view(-1, 1, 1, 1)
    # Padding leaves the incoming state untouched (truncation never cuts padded rows, so S and
    # P_in equal the carried state there, up to the "stop" re-parametrisation).
    new_state = MatrixMemoryState(
        S=torch.where(keep, S_new, S),
        P=torch.where(keep, P, P_in),
        log_decay=torch.where(_rows(valid, log_decay), log_decay, carried_decay),
        phase=torch.where(valid, torch.where(finished, 0, phase), state.phase),
        chunks_done=torch.where(valid, state.chunks_done + finished.long(), state.chunks_done),
        init=state.init,
        momentum=torch.where(keep, m_new, m),
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
    momentum: Tensor | None = None,
) -> tuple[Tensor, MatrixMemoryState]:
    """Loop ``step`` over the T tokens.

    q, k: (B,H,T,dk); v: (B,H,T,dv); lr: (B,H,T); retain: (B,H,T) or (B,H,T,dk) per channel;
    lengths: (B,) int64 valid lengths or None; momentum: β (B,H,T) or (B,H,T,dk), for "momentum_gd".
    Returns o (B,H,T,dv) and the state after each row's last valid token.
    """
    steps = q.shape[2]
    outputs = []
    for t in range(steps):
        valid_t = None if lengths is None else lengths > t
        beta_t = None if momentum is None else momentum[:, :, t]
        o_t, state = step(state, q[:, :, t], k[:, :, t], v[:, :, t], lr[:, :, t], retain[:, :, t], cfg, valid_t, beta_t)
        outputs.append(o_t)
    if not outputs:
        return q.new_zeros(*q.shape[:2], 0, v.shape[-1]), state
    return torch.stack(outputs, dim=2), state

"""Per-token reference implementation of an MLP-memory level (the oracle).

For token t in the chunk starting at b (b a multiple of C from the document start), with
θ = (W1, W2) and M_θ(x) = x + W1 σ(W2 x) (or x + LN(W1 σ(W2 x))):

    g_t = ∂ℓ(θ; k_t, v_t)/∂θ at θ = θ_{b-1}      (g1 = δ sᵀ, g2 = u kᵀ, see ``token_gradients``)
    "gd":           θ_t = α_t θ_{t-1} - η_t g_t
    "momentum_gd":  m_t = β_t m_{t-1} - η_t g_t,   θ_t = α_t θ_{t-1} + m_t   (per parameter)
    "dgd":          W2_t = W2_{t-1} (α_t I - η_t k̂_t k̂_tᵀ) - η_t g2_t,   W1_t = α_t W1_{t-1} - η_t g1_t
                    (``dgd_both``: W1_t = α_t W1_{t-1} - η_t (W1_{t-1} ŝ_t) ŝ_tᵀ - η_t g1_t, ŝ_t = s_t / ‖s_t‖ with
                    s_t = σ(W2 k_t) at the linearisation point, the input of W1 in g1_t = δ_t s_tᵀ)
    "newton_schulz": m_t = β_t m_{t-1} + g_t,   W_t = α_t W_{t-1} - η_t NS_steps(m_t)   (per weight matrix;
                    β = 0 without a momentum rate)
    "delta_momentum": m_t = α_t m_{t-1} - λ m_{t-1} ĝ_tᵀ ĝ_t - η_t g_t,   W_t = W_{t-1} + m_t   (per weight
                    matrix, ĝ = g / (‖g‖_F + ε); ĝ1ᵀĝ1 is h×h for W1, ĝ2ᵀĝ2 is d×d for W2)
    o_t = M_{θ_τ}(q_t),   τ = t ("online"), t-1 ("before"), b-1 ("boundary")
    (with a windowed objective g_t sums the gradients of the last c keys and values: ``memory_maps``)

A per-channel α (or β) of shape (B,H,d) multiplies W2 on the input side (W2·diag(α)) and W1 on the
output side (diag(α)·W1); delta_momentum's α acts on the momenta the same way (diag(α)·m1,
m2·diag(α)).  Outer-gradient modes as for the matrix memory: "stop" makes every state
θ_init + sg(θ - θ_init) (momentum detached), "truncate" detaches the whole state at chunk starts
b > 0 with (b / C) mod k = 0.  Padding (valid = False) leaves the state untouched and outputs 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..matrix_memory.state import normalised, stop_gradient
from ..newton_schulz import newton_schulz
from .state import MLPMemoryConfig, MLPMemoryState, apply_memory, token_gradients


def scale_out(W1: Tensor, rate: Tensor) -> Tensor:
    """diag(rate)·W1 for W1 (B,H,d,h), rate (B,H) or (B,H,d)."""
    return rate[..., None, None] * W1 if rate.dim() == 2 else W1 * rate[..., :, None]


def scale_in(W2: Tensor, rate: Tensor) -> Tensor:
    """W2·diag(rate) for W2 (B,H,h,d), rate (B,H) or (B,H,d)."""
    return rate[..., None, None] * W2 if rate.dim() == 2 else W2 * rate[..., None, :]


def _entering(state: MLPMemoryState, cfg: MLPMemoryConfig, valid: Tensor) -> tuple[Tensor, ...]:
    """(W1, W2, P1, P2, M1, M2) as seen by the next token, with the outer-gradient mode applied."""
    W1, W2, P1, P2, M1, M2 = state.tensors()
    if cfg.grad == "stop":
        return (
            stop_gradient(W1, state.init1),
            stop_gradient(W2, state.init2),
            stop_gradient(P1, state.init1),
            stop_gradient(P2, state.init2),
            M1.detach(),
            M2.detach(),
        )
    if cfg.grad == "truncate":
        done = state.chunks_done
        cut = ((state.phase == 0) & (done > 0) & (done % cfg.truncate_k == 0) & valid).view(-1, 1, 1, 1)
        return tuple(torch.where(cut, x.detach(), x) for x in (W1, W2, P1, P2, M1, M2))
    return W1, W2, P1, P2, M1, M2


def step(
    state: MLPMemoryState,
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    lr_t: Tensor,
    retain_t: Tensor,
    cfg: MLPMemoryConfig,
    valid_t: Tensor | None = None,
    momentum_t: Tensor | None = None,
) -> tuple[Tensor, MLPMemoryState]:
    """One token for all rows: q_t, k_t, v_t (B,H,d); lr_t (B,H); retain_t, momentum_t (B,H) or (B,H,d).

    Returns o_t (B,H,d) and the state after the token.
    """
    batch = q_t.shape[0]
    valid = valid_t if valid_t is not None else torch.ones(batch, dtype=torch.bool, device=q_t.device)
    W1, W2, P1_in, P2_in, M1, M2 = _entering(state, cfg, valid)

    starting = (state.phase == 0).view(-1, 1, 1, 1)
    P1 = torch.where(starting, W1, P1_in)
    P2 = torch.where(starting, W2, P2_in)

    # With a windowed objective k_t, v_t are (B,H,c,d) stacks and each g sums its c rank-one terms.
    keys = k_t if cfg.window > 1 else k_t[:, :, None]
    delta, s, u = token_gradients(P1, P2, keys, v_t if cfg.window > 1 else v_t[:, :, None], cfg)
    g1 = delta.transpose(-1, -2) @ s
    g2 = u.transpose(-1, -2) @ keys
    eta = lr_t[..., None, None]
    N1, N2 = M1, M2
    if cfg.optimizer == "gd":
        W1_new = scale_out(W1, retain_t) - eta * g1
        W2_new = scale_in(W2, retain_t) - eta * g2
    elif cfg.optimizer == "momentum_gd":
        if momentum_t is None:
            raise ValueError('optimizer "momentum_gd" needs the momentum rate β (momentum_t)')
        N1 = scale_out(M1, momentum_t) - eta * g1
        N2 = scale_in(M2, momentum_t) - eta * g2
        W1_new = scale_out(W1, retain_t) + N1
        W2_new = scale_in(W2, retain_t) + N2
    elif cfg.optimizer == "newton_schulz":
        N1 = g1 if momentum_t is None else scale_out(M1, momentum_t) + g1
        N2 = g2 if momentum_t is None else scale_in(M2, momentum_t) + g2
        W1_new = scale_out(W1, retain_t) - eta * newton_schulz(N1, cfg.steps)
        W2_new = scale_in(W2, retain_t) - eta * newton_schulz(N2, cfg.steps)
    elif cfg.optimizer == "delta_momentum":
        h1, h2 = normalised(g1, cfg.eps), normalised(g2, cfg.eps)
        N1 = scale_out(M1, retain_t) - cfg.lam * (M1 @ h1.transpose(-1, -2)) @ h1 - eta * g1
        N2 = scale_in(M2, retain_t) - cfg.lam * (M2 @ h2.transpose(-1, -2)) @ h2 - eta * g2
        W1_new, W2_new = W1 + N1, W2 + N2
    else:  # dgd: the rank-one factor on the input-side map W2, with the normalised key
        k_hat = torch.nn.functional.normalize(k_t, dim=-1)
        W2_k = torch.einsum("bhnd,bhd->bhn", W2, k_hat)
        W2_new = scale_in(W2, retain_t) - eta * W2_k[..., :, None] * k_hat[..., None, :] - eta * g2
        W1_new = scale_out(W1, retain_t) - eta * g1
        if cfg.dgd_both:  # the factor on W1 too, with its normalised input at the linearisation point
            s_hat = torch.nn.functional.normalize(s[:, :, 0], dim=-1)
            W1_s = torch.einsum("bhdn,bhn->bhd", W1, s_hat)
            W1_new = W1_new - eta * W1_s[..., :, None] * s_hat[..., None, :]
    if cfg.grad == "stop":
        W1_new, W2_new = stop_gradient(W1_new, state.init1), stop_gradient(W2_new, state.init2)
        N1, N2 = N1.detach(), N2.detach()

    read_from = {"online": (W1_new, W2_new), "before": (W1, W2), "boundary": (P1, P2)}[cfg.read]
    o_t = apply_memory(*read_from, q_t[:, :, None], cfg)[:, :, 0]

    phase = state.phase + 1
    finished = phase == cfg.chunk
    keep = valid.view(-1, 1, 1, 1)
    new_state = MLPMemoryState(
        W1=torch.where(keep, W1_new, W1),
        W2=torch.where(keep, W2_new, W2),
        P1=torch.where(keep, P1, P1_in),
        P2=torch.where(keep, P2, P2_in),
        phase=torch.where(valid, torch.where(finished, 0, phase), state.phase),
        chunks_done=torch.where(valid, state.chunks_done + finished.long(), state.chunks_done),
        init1=state.init1,
        init2=state.init2,
        M1=torch.where(keep, N1, M1),
        M2=torch.where(keep, N2, M2),
    )
    o_t = torch.where(valid[:, None, None], o_t, torch.zeros_like(o_t))
    return o_t, new_state


def scan(
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
    """Loop ``step`` over T tokens: q, k, v (B,H,T,d); lr (B,H,T); retain, momentum (B,H,T) or (B,H,T,d).

    Returns o (B,H,T,d) and the state after each row's last valid token.
    """
    outputs = []
    for t in range(q.shape[2]):
        valid_t = None if lengths is None else lengths > t
        beta_t = None if momentum is None else momentum[:, :, t]
        o_t, state = step(state, q[:, :, t], k[:, :, t], v[:, :, t], lr[:, :, t], retain[:, :, t], cfg, valid_t, beta_t)
        outputs.append(o_t)
    if not outputs:
        return q.new_zeros(q.shape), state
    return torch.stack(outputs, dim=2), state

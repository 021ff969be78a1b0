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

Every objective ("l2", "dot", "lp", "huber") has this form: only e = ∂ℓ/∂M(k) in ``token_gradients``
changes, and the gradients stay rank one given θ_{b-1}.

Per-channel rates (α and/or β of shape (B,H,T,d); W2 ← W2·diag(α), W1 ← diag(α)·W1) keep the same form
with one coefficient per model channel: X[n, s, c] = Σ_r Dα_c[n, r] Dβ_c[r, s], every ratio
Γ_n[c]/Γ_{r+1}[c] taken as exp(log Γ_n - log Γ_{r+1}) under the mask r < n (≤ 1, never overflows, no
clamping).  Reads contract the channel inside the score, e.g.

    W2_τ q = W2_e (Γ_τ ∘ q) + M2_e (c_τ ∘ q) - Σ_s η_s u_s Σ_c X[τ, s, c] k_s[c] q[c],

an explicit (L, L, d) tensor per chunk (L ≤ C), cheap for the chunk sizes used here and exact.

"dgd" (W2 ← W2 (α I - η k̂ k̂ᵀ) - η u kᵀ, W1 ← α ∘ W1 - η δ sᵀ): W1 is the "gd" form.  For W2 write
W2_{i+1} = W2_i ∘ α_i + w_i k̂_iᵀ - η_i u_i k_iᵀ with w_i = -η_i W2_i k̂_i; expanding W2_i gives a unit
lower-triangular system for the w of the segment (the WY/UT form of the delta rule, ``_dgd_updates``),
solved once per segment; u (the back-propagated signal at the chunk start) is fixed inside it.

Scope of the parallel form: "gd", "momentum_gd" and "dgd", rates per head or per channel.
"newton_schulz" (a non-linear map of the momentum every token) and "delta_momentum" (its factor
(αI - λĝᵀĝ) multiplies the momentum, a product of per-token factors) run through ``_scan_fallback``,
the documented compiled-scan fallback (DESIGN §3): the reference recurrence behind the same API.
At C = 1 the block loop is itself a per-token scan (DESIGN §3: an MLP memory updated every token has
no parallel form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..matrix_memory.state import truncation_mask
from . import reference
from .state import (
    MLPMemoryConfig,
    MLPMemoryState,
    activation,
    init_rows,
    output_map,
    safe_log,
    token_gradients,
)


def has_parallel_form(cfg: MLPMemoryConfig, retain: Tensor, momentum: Tensor | None) -> bool:
    """Whether ``chunked`` runs the chunk-parallel form (True) or the scan fallback (False).

    Parallel: "gd", "dgd" and "momentum_gd" (with its β given), rates per head or per channel.
    """
    if cfg.window > 1 or cfg.optimizer not in ("gd", "momentum_gd", "dgd") or retain.dim() not in (3, 4):
        return False
    return cfg.optimizer != "momentum_gd" or (momentum is not None and momentum.dim() in (3, 4))


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
    """exp(log_hi[n] - log_lo[r]) where mask[n, r] else 0: (...,N), (...,R), mask broadcastable -> (...,N,R)."""
    diff = log_hi[..., :, None] - log_lo[..., None, :]
    return torch.where(mask, diff, float("-inf")).exp()


def _per_channel(x: Tensor, d: int) -> Tensor:
    """A rate's logs (B,H,L) or (B,H,L,d) as (B,H,d,L): the channel axis before the time axis."""
    if x.dim() == 3:
        x = x[..., None].expand(*x.shape, d)
    return x.transpose(-1, -2)


def _channels_last(x: Tensor) -> Tensor:
    """(B,H,d,N,R) -> (B,H,N,R,d)."""
    return x.permute(0, 1, 3, 4, 2)


@dataclass
class _Mix:
    """How the states of a segment are made of the entering state and the token terms.

    Per-head rates: gamma (B,H,L+1), coef (B,H,L+1,L), carry (B,H,L+1) or None.  Per-channel rates: the
    same with a trailing channel axis d: gamma (B,H,L+1,d), coef (B,H,L+1,L,d), carry (B,H,L+1,d).
    θ_n = Γ_n ∘ θ_e + c_n ∘ m_e + Σ_s coef[n, s] ∘ (terms of token s), ∘ acting on the model channels.
    """

    gamma: Tensor
    coef: Tensor
    carry: Tensor | None

    @property
    def channel(self) -> bool:
        return self.gamma.dim() == 4


def _mixing(log_a: Tensor, log_b: Tensor | None, active: Tensor, d: int) -> tuple[_Mix, _Mix]:
    """(Dα-mix, X-mix): Dα[n, r] = Γ_n/Γ_{r+1} (r < n, active r); X = Dα (no momentum) or Dα·Dβ.

    The carry coefficient c = Dα·(β_0⋯β_r) of the momentum entering the segment sits in X-mix.
    """
    length = log_a.shape[2]
    states = torch.arange(length + 1, device=log_a.device)
    tokens = torch.arange(length, device=log_a.device)
    lower = (tokens[None, :] < states[:, None])[None] & active[:, None, :]  # (B,L+1,L)
    channel = log_a.dim() == 4 or (log_b is not None and log_b.dim() == 4)
    if not channel:
        G = torch.nn.functional.pad(log_a.cumsum(-1), (1, 0))  # log Γ at state indices 0..L
        d_alpha = _lower_ratio(G, G[..., 1:], lower[:, None])
        plain = _Mix(G.exp(), d_alpha, None)
        if log_b is None:
            return plain, plain
        Bc = log_b.cumsum(-1)  # log β_0⋯β_r
        d_beta = _lower_ratio(Bc, Bc, (tokens[None, :] <= tokens[:, None])[None, None])
        return plain, _Mix(plain.gamma, d_alpha @ d_beta, (d_alpha @ Bc.exp()[..., None])[..., 0])
    la = _per_channel(log_a, d)  # (B,H,d,L)
    G = torch.nn.functional.pad(la.cumsum(-1), (1, 0))  # (B,H,d,L+1)
    d_alpha = _lower_ratio(G, G[..., 1:], lower[:, None, None])  # (B,H,d,L+1,L)
    gamma = G.exp().transpose(-1, -2)
    plain = _Mix(gamma, _channels_last(d_alpha), None)
    if log_b is None:
        return plain, plain
    Bc = _per_channel(log_b, d).cumsum(-1)  # (B,H,d,L)
    d_beta = _lower_ratio(Bc, Bc, (tokens[None, :] <= tokens[:, None])[None, None, None])
    mixed = _channels_last(d_alpha @ d_beta)
    carry = (d_alpha @ Bc.exp()[..., None])[..., 0].transpose(-1, -2)
    return plain, _Mix(gamma, mixed, carry)


@dataclass
class _Terms:
    """Σ_s coef[n, s] ∘ left_s right_sᵀ for one weight: left (B,H,L,rows), right (B,H,L,cols)."""

    mix: _Mix
    left: Tensor
    right: Tensor


def _apply_in(terms: list[_Terms], tau: slice, x: Tensor) -> Tensor:
    """Σ terms of W2 (channel on the input/column axis) at states tau applied to x: (B,H,L,d) -> (B,H,L,h).

    tau: the states read by the queries (rows of x), a slice of length L of the state indices 0..L.
    """
    out = None
    for t in terms:
        coef = t.mix.coef[:, :, tau]
        if t.mix.channel:  # Σ_c coef[τ, s, c] x[c] right_s[c]
            scores = (coef * (x[..., :, None, :] * t.right[..., None, :, :])).sum(-1)
        else:
            scores = coef * (x @ t.right.transpose(-1, -2))
        piece = scores @ t.left
        out = piece if out is None else out + piece
    assert out is not None
    return out


def _apply_out(terms: list[_Terms], tau: slice, x: Tensor) -> Tensor:
    """Σ terms of W1 (channel on the output/row axis) at states tau applied to x: (B,H,L,h) -> (B,H,L,d)."""
    out = None
    for t in terms:
        coef = t.mix.coef[:, :, tau]
        dots = x @ t.right.transpose(-1, -2)  # (B,H,L,L)
        if t.mix.channel:  # Σ_s coef[τ, s, c] (x·right_s) left_s[c]
            piece = ((coef * dots[..., None]) * t.left[..., None, :, :]).sum(-2)
        else:
            piece = (coef * dots) @ t.left
        out = piece if out is None else out + piece
    assert out is not None
    return out


def _end_in(terms: list[_Terms], length: int) -> Tensor:
    """Σ terms of W2 at the end state: Σ_s left_s (coef[L, s] ∘ right_s)ᵀ, (B,H,h,d)."""
    out = None
    for t in terms:
        coef = t.mix.coef[:, :, length]
        right = coef * t.right if t.mix.channel else coef[..., None] * t.right
        piece = t.left.transpose(-1, -2) @ right
        out = piece if out is None else out + piece
    assert out is not None
    return out


def _end_out(terms: list[_Terms], length: int) -> Tensor:
    """Σ terms of W1 at the end state: Σ_s (coef[L, s] ∘ left_s) right_sᵀ, (B,H,d,h)."""
    out = None
    for t in terms:
        coef = t.mix.coef[:, :, length]
        left = coef * t.left if t.mix.channel else coef[..., None] * t.left
        piece = left.transpose(-1, -2) @ t.right
        out = piece if out is None else out + piece
    assert out is not None
    return out


def _scale(x: Tensor, rate: Tensor, side: str) -> Tensor:
    """rate ∘ x for a weight x (B,H,m,n): rate (B,H) or (B,H,d) on the columns ("in") or rows ("out")."""
    if rate.dim() == 2:
        return rate[..., None, None] * x
    return x * rate[..., None, :] if side == "in" else x * rate[..., :, None]


def _dgd_updates(plain: _Mix, W2e: Tensor, k: Tensor, k_hat: Tensor, u: Tensor, lr: Tensor) -> Tensor:
    """dgd's W2 directions w (B,H,L,h): W2_{i+1} = W2_i ∘ α_i + w_i k̂_iᵀ - η_i u_i k_iᵀ, w_i = -η_i W2_i k̂_i.

    W2_i k̂_i = Γ_i ∘ W2_e k̂_i + Σ_{r<i} Dα[i, r] ((k̂_r ∘ k̂_i) w_r - η_r (k_r ∘ k̂_i) u_r): a unit lower
    triangular system (I + diag(η) A) W = -diag(η) (W2_e (Γ ∘ k̂) - Σ_r Dα η_r (k_r ∘ k̂) u_r) (WY/UT form).
    """
    length = k.shape[2]
    own = _Mix(plain.gamma[:, :, :length], plain.coef[:, :, :length], None)
    grad = _Terms(own, -lr[..., None] * u, k)
    if own.channel:
        base = (own.gamma * k_hat) @ W2e.transpose(-1, -2)
        A = (own.coef * (k_hat[..., :, None, :] * k_hat[..., None, :, :])).sum(-1)
    else:
        base = own.gamma[..., None] * (k_hat @ W2e.transpose(-1, -2))
        A = own.coef * (k_hat @ k_hat.transpose(-1, -2))
    rhs = -lr[..., None] * (base + _apply_in([grad], slice(0, length), k_hat))
    eye = torch.eye(length, dtype=k.dtype, device=k.device)
    return torch.linalg.solve_triangular(eye + lr[..., None] * A, rhs, upper=False, unitriangular=True)


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
    log_a, log_b: (B,H,L) per head or (B,H,L,d) per channel.
    Returns the outputs (B,H,L,d) (meaningful at active tokens) and (W1, W2, M1, M2) after the block.
    """
    W1e, W2e, M1e, M2e = enter
    length, d = q.shape[2], q.shape[3]
    delta, s, u = token_gradients(lin[0], lin[1], k, v, cfg)
    plain, mix = _mixing(log_a, log_b, active, d)
    # W1_n = Γ_n ∘ W1e + c_n ∘ M1e - Σ_s X[n, s] η_s δ_s s_sᵀ (and likewise W2 with u_s k_sᵀ), except
    # that dgd's W2 is W2_n = Γ_n ∘ W2e + Σ_s Dα[n, s] (w_s k̂_sᵀ - η_s u_s k_sᵀ).
    terms1 = [_Terms(mix, -lr[..., None] * delta, s)]
    terms2 = [_Terms(mix, -lr[..., None] * u, k)]
    if cfg.optimizer == "dgd":
        k_hat = torch.nn.functional.normalize(k, dim=-1)
        terms2.append(_Terms(plain, _dgd_updates(plain, W2e, k, k_hat, u, lr), k_hat))

    if cfg.read == "boundary":
        W1r, W2r = lin
        if stop_delta is not None:
            W1r, W2r = W1r + stop_delta[0], W2r + stop_delta[1]
        pre = q @ W2r.transpose(-1, -2)
        p = activation(pre)
        z = p @ W1r.transpose(-1, -2)
    else:
        tau = slice(1, length + 1) if cfg.read == "online" else slice(0, length)
        gamma = mix.gamma[:, :, tau]
        if mix.channel:
            pre = (gamma * q) @ W2e.transpose(-1, -2)
        else:
            pre = gamma[..., None] * (q @ W2e.transpose(-1, -2))
        pre = pre + _apply_in(terms2, tau, q)
        if mix.carry is not None:
            c_tau = mix.carry[:, :, tau]
            pre = pre + ((c_tau * q) if mix.channel else c_tau[..., None] * q) @ M2e.transpose(-1, -2)
        if stop_delta is not None:
            pre = pre + q @ stop_delta[1].transpose(-1, -2)
        p = activation(pre)
        z = p @ W1e.transpose(-1, -2)
        z = (gamma * z if mix.channel else gamma[..., None] * z) + _apply_out(terms1, tau, p)
        if mix.carry is not None:
            c_tau = mix.carry[:, :, tau]
            zm = p @ M1e.transpose(-1, -2)
            z = z + (c_tau * zm if mix.channel else c_tau[..., None] * zm)
        if stop_delta is not None:
            z = z + p @ stop_delta[0].transpose(-1, -2)
    out = q + output_map(z, cfg)

    # The state after the block (index L).
    gamma_end = mix.gamma[:, :, length]
    W1 = _scale(W1e, gamma_end, "out") + _end_out(terms1, length)
    W2 = _scale(W2e, gamma_end, "in") + _end_in(terms2, length)
    M1, M2 = M1e, M2e
    if log_b is not None and mix.carry is not None:
        c_end = mix.carry[:, :, length]
        W1, W2 = W1 + _scale(M1e, c_end, "out"), W2 + _scale(M2e, c_end, "in")
        # m after the block: β_0⋯β_{L-1} m_e - Σ_s (β_{s+1}⋯β_{L-1}) η_s g_s.
        lb = log_b if not mix.channel or log_b.dim() == 4 else log_b[..., None].expand(*log_b.shape, d)
        Bc = lb.cumsum(2)
        b_end = (Bc[:, :, -1:] - Bc).exp()  # (B,H,L) or (B,H,L,d)
        beta_all = Bc[:, :, -1].exp()
        lead = b_end * lr[..., None] if mix.channel else (b_end * lr)[..., None]
        M1 = _scale(M1e, beta_all, "out") - (lead * delta).transpose(-1, -2) @ s
        M2 = _scale(M2e, beta_all, "in") - u.transpose(-1, -2) @ (lead * k)
    return out, (W1, W2, M1, M2)


def _time_mask(mask: Tensor, rate: Tensor) -> Tensor:
    """A (B,T) token mask viewed against a rate (B,H,T) or (B,H,T,d)."""
    return mask[:, None, :, None] if rate.dim() == 4 else mask[:, None]


def _masked_logs(active: Tensor, logs: Tensor) -> Tensor:
    """Logs of a rate with the inactive tokens set to 0 (rate 1)."""
    return torch.where(_time_mask(active, logs), logs, torch.zeros_like(logs))


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
    log_a = torch.where(_time_mask(valid, retain), safe_log(retain), torch.zeros_like(retain))
    log_b = None
    if use_momentum and momentum is not None:
        log_b = torch.where(_time_mask(valid, momentum), safe_log(momentum), torch.zeros_like(momentum))
    cuts = truncation_mask(state.phase, state.chunks_done, cfg, steps) & valid if cfg.grad == "truncate" else None

    W1, W2, P1, P2, M1, M2 = carry.tensors()
    phase, done = carry.phase, carry.chunks_done
    outputs = []
    # Blocks as views from one split (its backward is one concatenation, where slicing each block
    # would materialise a full-length zero gradient per block and input: O(T²/C) work).
    pieces = [x.split(cfg.chunk, dim=2) for x in (q, k, v, lr, log_a)]
    beta_pieces = None if log_b is None else log_b.split(cfg.chunk, dim=2)
    for number, pos in enumerate(range(0, steps, cfg.chunk)):
        end = min(pos + cfg.chunk, steps)
        length = end - pos
        local = torch.arange(length, device=device)
        # Local index of the (at most one) chunk start in this block, per row.
        first = (cfg.chunk - phase) % cfg.chunk
        live = valid[:, pos:end]
        stage_a = live & (local[None, :] < first[:, None])
        stage_b = live & (local[None, :] >= first[:, None])
        sl = slice(pos, end)
        q_b, k_b, v_b, lr_b, la_b = (x[number] for x in pieces)
        lb_b = None if beta_pieces is None else beta_pieces[number]

        def run(
            enter: tuple[Tensor, Tensor, Tensor, Tensor],
            lin: tuple[Tensor, Tensor],
            active: Tensor,
            blk: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None] = (q_b, k_b, v_b, lr_b, la_b, lb_b),
        ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
            qs, ks, vs, lrs, las, lbs = blk
            return _segment(
                enter,
                lin,
                qs,
                ks,
                vs,
                torch.where(active[:, None], lrs, torch.zeros_like(lrs)),
                _masked_logs(active, las),
                None if lbs is None else _masked_logs(active, lbs),
                active,
                cfg,
                stop_delta,
            )

        out = q.new_zeros(q_b.shape)
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

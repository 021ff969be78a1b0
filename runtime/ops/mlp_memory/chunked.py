"""Chunk-parallel (dual form) implementation of an MLP-memory level.

Inside a chunk every g_t is taken at the chunk-start state θ⁰ = θ_{b-1}, so all of them are computed
at once, and each is a sum of rank-one terms: g1_s = δ_s s_sᵀ, g2_s = u_s k_sᵀ (``token_gradients``).
With "gd" / "momentum_gd" every state inside the chunk is

    θ_n = Γ_n ∘ θ_e + c_n ∘ m_e - Σ_s X[n, s] ∘ η_s g_s          (n = state index, 0 = entering state θ_e)

with Γ the cumulative retention, X = Dα (gd) or Dα·Dβ (momentum: Dα[n, r] = Γ_n/Γ_{r+1},
Dβ[r, s] = β_{s+1}⋯β_r) and c = Dα·(β_0⋯β_r); ∘ acts on the model channels (W2 ← W2·diag(α),
W1 ← diag(α)·W1), one coefficient per channel for per-channel rates, one per head otherwise.  Every
ratio Γ_n/Γ_{r+1} is exp(log Γ_n - log Γ_{r+1}) under the mask r < n (≤ 1, never overflows).  Reads
then never materialise per-token weights:

    W2_τ q = W2_e (Γ_τ ∘ q) + M2_e (c_τ ∘ q) - Σ_s η_s u_s Σ_c X[τ, s, c] k_s[c] q[c],      p = σ(W2_τ q),
    W1_τ p = Γ_τ ∘ W1_e p + c_τ ∘ M1_e p - Σ_s η_s (s_s·p) X[τ, s] ∘ δ_s,                  o = q + W1_τ p (or LN).

How the work is laid out (the speed):
- Everything that does not depend on the running state is computed once for a group of blocks, batched
  over the blocks (``_prepare``): the coefficients X, Γ, c, the scores Σ_c X[τ, s, c] k_s[c] q_τ[c], the
  rate-scaled queries [Γ_τ ∘ q, c_τ ∘ q], the end-of-block coefficients, and dgd's triangular inverse.
- The state is carried stacked, [W1; M1] (B,H,2d,h) and [W2 | M2] (B,H,h,2d), so each read of W and
  m together is one matrix product, and each end-of-block update one ``baddbmm`` onto the decayed state.
- What is left per block (``_step``) is the state-dependent algebra: the token gradients at the chunk
  start, the reads and the end state.  ``NESTC_COMPILE=1`` (or ``set_compile(True)``) runs that step
  under ``torch.compile``; the default and the fallback (compile unavailable) run the same function eagerly.

The loop runs over blocks of C tokens (chunks are sequential: each linearises at the previous one's
end).  Rows may have different phases (streaming, packing): a block then holds the tail of a row's
carried chunk (stage A, linearised at the carried P) and the head of its next chunk (stage B,
linearised at the state where it starts), each computed in parallel with masks (inactive tokens are
no-ops: η = 0, α = β = 1).

Every objective ("l2", "dot", "lp", "huber") has this form: only e = ∂ℓ/∂M(k) in ``token_gradients``
changes, and the gradients stay rank one given θ_{b-1}.

"dgd" (W2 ← W2 (α I - η k̂ k̂ᵀ) - η u kᵀ, W1 ← α ∘ W1 - η δ sᵀ): W1 is the "gd" form.  For W2 write
W2_{i+1} = W2_i ∘ α_i + w_i k̂_iᵀ - η_i u_i k_iᵀ with w_i = -η_i W2_i k̂_i; expanding W2_i gives a unit
lower-triangular system (I + diag(η) A) w = -diag(η) (W2_e (Γ ∘ k̂) + Σ_r X η_r (k_r ∘ k̂) u_r) for the
w of the segment (the WY/UT form of the delta rule); its inverse does not depend on the state and is
formed once per group of blocks; u (the back-propagated signal at the chunk start) is fixed inside it.
"dgd" with ``dgd_both`` gives W1 the same factor, W1_{i+1} = α_i ∘ W1_i + w1_i ŝ_iᵀ - η_i δ_i s_iᵀ with
w1_i = -η_i W1_i ŝ_i and ŝ = s/‖s‖ from the chunk start: that key depends on the state, so W1's system
(one per channel with per-channel rates, since X then differs per output channel) is solved per block.

Scope of the parallel form: "gd", "momentum_gd" and "dgd", rates per head or per channel.
"newton_schulz" (a non-linear map of the momentum every token) and "delta_momentum" (its factor
(αI - λĝᵀĝ) multiplies the momentum, a product of per-token factors) run through ``_scan_fallback``,
the documented compiled-scan fallback (DESIGN §3): the reference recurrence behind the same API. So does
C = 1, where the block loop would itself be a per-token scan (DESIGN §3: an MLP memory updated every token
has no parallel form), only not compiled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from .. import compiled_scan
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

# Tokens whose state-independent coefficients are formed at once (bounds the (L, L, d) tensors' memory).
GROUP_TOKENS = 128


def has_parallel_form(cfg: MLPMemoryConfig, retain: Tensor, momentum: Tensor | None) -> bool:
    """Whether ``chunked`` runs the chunk-parallel form (True) or the scan fallback (False).

    Parallel: "gd", "dgd" and "momentum_gd" (with its β given), rates per head or per channel, chunks of at
    least two tokens. Updated every token, the chunked form would be a loop of one-token blocks: the compiled
    scan runs it 3.6-5x faster once compiled (gd / dgd, B=2, H=4, d=32, T=256, fwd+bwd, 1 thread).
    """
    if cfg.window > 1 or cfg.optimizer not in ("gd", "momentum_gd", "dgd") or retain.dim() not in (3, 4):
        return False
    if cfg.chunk == 1:
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
    """The compiled-scan fallback (DESIGN §3): ``reference.step`` per token, in compiled blocks
    (``runtime/ops/compiled_scan.py``), so outputs, states and gradients are those of the oracle."""
    if q.shape[2] == 0:
        return reference.scan(q, k, v, lr, retain, state, cfg, lengths=lengths, momentum=momentum)
    valid = compiled_scan.valid_tokens(lengths, q.shape[2])
    carry = (state.W1, state.W2, state.P1, state.P2, state.phase, state.chunks_done, state.M1, state.M2)
    inputs = (q, k, v, lr, retain, valid, momentum)
    o, after = compiled_scan.scan(_scan_step, carry, inputs, (state.init1, state.init2), cfg)
    W1, W2, P1, P2, phase, done, M1, M2 = after
    return o, MLPMemoryState(W1, W2, P1, P2, phase, done, state.init1, state.init2, M1, M2)


def _scan_step(
    carry: tuple[Tensor, ...], inputs: tuple[Tensor | None, ...], consts: tuple[Tensor, ...], cfg: MLPMemoryConfig
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``reference.step`` on flat tensors (the form ``compiled_scan`` threads through a block)."""
    W1, W2, P1, P2, phase, chunks_done, M1, M2 = carry
    q_t, k_t, v_t, lr_t, retain_t, valid_t, beta_t = inputs
    state = MLPMemoryState(W1, W2, P1, P2, phase, chunks_done, consts[0], consts[1], M1, M2)
    assert q_t is not None and k_t is not None and v_t is not None and lr_t is not None and retain_t is not None
    valid = None if valid_t is None else valid_t[:, 0]
    o_t, new = reference.step(state, q_t, k_t, v_t, lr_t, retain_t, cfg, valid, beta_t)
    return o_t, (new.W1, new.W2, new.P1, new.P2, new.phase, new.chunks_done, new.M1, new.M2)


# ---------------------------------------------------------------- torch.compile of the per-block step

_COMPILE = {"on": os.environ.get("NESTC_COMPILE", "0") == "1"}
_COMPILED: dict[MLPMemoryConfig, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {}


def set_compile(on: bool) -> None:
    """Run the per-block step under ``torch.compile`` (True) or eagerly (False, the default)."""
    _COMPILE["on"] = on


def _step_fn(cfg: MLPMemoryConfig) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The per-block step, compiled once per configuration when asked and possible, else eager."""
    if not _COMPILE["on"]:
        return _step
    if cfg not in _COMPILED:
        try:
            _COMPILED[cfg] = _guarded(torch.compile(_step, dynamic=False))
        except Exception:  # torch.compile itself unavailable: the same step, eagerly
            _COMPILED[cfg] = _step
    return _COMPILED[cfg]


def _guarded(compiled: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """``compiled``, or the eager step from the first failure on (compiling happens at the first call: no
    C++ compiler, an unsupported op).  The step is pure, so rerunning it eagerly is exact; an error that is
    not the compiler's reappears in the eager run."""
    failed: list[bool] = []

    def run(*args: object) -> tuple[Tensor, Tensor, Tensor]:
        if not failed:
            try:
                return compiled(*args)
            except Exception:
                failed.append(True)
        return _step(*args)  # type: ignore[arg-type]

    return run


# ---------------------------------------------------------------- state-independent coefficients


def _lower_ratio(log_hi: Tensor, log_lo: Tensor, mask: Tensor) -> Tensor:
    """exp(log_hi[n] - log_lo[r]) where mask[n, r] else 0: (...,N), (...,R), mask broadcastable -> (...,N,R)."""
    diff = log_hi[..., :, None] - log_lo[..., None, :]
    return torch.where(mask, diff, float("-inf")).exp()


def _channels_last(x: Tensor) -> Tensor:
    """A rate (R,H,L) or (R,H,L,d) as (R,H,L,w), w = 1 or d."""
    return x[..., None] if x.dim() == 3 else x


def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """Σ_{r<n} x[r] for n = 0..L along ``dim`` (one more entry than x: the empty sum first)."""
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([zero, x.cumsum(dim)], dim)


@dataclass
class _Mix:
    """How the states of a segment are made of the entering state and the token terms (channels last).

    gamma (R,H,L+1,w) = Γ_n.  X[n, s] (R,H,L+1,L,w) is either materialised (``coef``) or, without momentum,
    kept as its factors X[n, s] = Γ_n ∘ inv_s · mask[n, s] with inv_s = 1/Γ_{s+1} (R,H,L,w) and mask (R,L+1,L)
    = [s < n, s active].  With momentum also carry (R,H,L+1,w) = c_n, beta_end (R,H,L,wb) = β_{s+1}⋯β_{L-1}
    and beta_all (R,H,wb) = β_0⋯β_{L-1}.
    """

    gamma: Tensor
    coef: Tensor | None = None
    inv: Tensor | None = None
    mask: Tensor | None = None
    carry: Tensor | None = None
    beta_end: Tensor | None = None
    beta_all: Tensor | None = None

    def rows(self, n: slice | int) -> Tensor:
        """X[n, s] for the state indices n: (R,H,N,L,w) (or (R,H,L,w) for one index)."""
        if self.coef is not None:
            return self.coef[:, :, n]
        assert self.inv is not None and self.mask is not None
        gamma, mask = self.gamma[:, :, n], self.mask[:, None, n, :, None]
        if isinstance(n, int):
            return gamma[:, :, None] * self.inv * mask
        return gamma[:, :, :, None] * self.inv[:, :, None] * mask

    def contract(self, n: slice, x: Tensor, y: Tensor) -> Tensor:
        """Σ_c X[n, s, c] x_n[c] y_s[c] for x (R,H,N,d), y (R,H,L,d) -> (R,H,N,L)."""
        if self.coef is None:
            assert self.inv is not None and self.mask is not None
            return ((self.gamma[:, :, n] * x) @ (self.inv * y).transpose(-1, -2)) * self.mask[:, None, n]
        coef = self.coef[:, :, n]
        if coef.shape[-1] == 1:
            return coef[..., 0] * (x @ y.transpose(-1, -2))
        return ((coef * y[:, :, None]) @ x[..., None])[..., 0]


def _mixing(log_a: Tensor, log_b: Tensor | None, active: Tensor) -> _Mix:
    """X = Dα (no momentum) or Dα·Dβ, Dα[n, r] = Γ_n/Γ_{r+1} (r < n, active r), Dβ[r, s] = β_{s+1}⋯β_r.

    Where no segment decays by more than ``_safe_log_range`` (any realistic retention), Γ_n/Γ_{r+1} is the
    product Γ_n · (1/Γ_{r+1}) of two vectors, and X = Γ_n ∘ Σ_{r<n} (1/Γ_{r+1}) Dβ[r, s] a cumulative sum;
    otherwise every ratio is exp(log Γ_n - log Γ_{r+1}) under its mask (≤ 1, never overflows).
    """
    length = log_a.shape[2]
    la, lb = _channels_last(log_a), None if log_b is None else _channels_last(log_b)
    if lb is not None and lb.shape[-1] > la.shape[-1]:
        la = la.expand(*la.shape[:-1], lb.shape[-1])
    G = _exclusive_cumsum(la, 2)  # log Γ at state indices 0..L
    states = torch.arange(length + 1, device=log_a.device)
    tokens = torch.arange(length, device=log_a.device)
    lower = (tokens[None, :] < states[:, None])[None] & active[:, None, :]  # (R,L+1,L)
    factored = _factorable(G)
    gamma = G.exp()
    if factored:
        inv = torch.where(active[:, None, :, None], (-G[:, :, 1:]).exp(), torch.zeros_like(la))
    if lb is None:
        if factored:
            return _Mix(gamma, inv=inv, mask=lower)
        d_alpha = _lower_ratio(G.transpose(-1, -2), G[:, :, 1:].transpose(-1, -2), lower[:, None, None])
        return _Mix(gamma, coef=d_alpha.permute(0, 1, 3, 4, 2))
    Bc = lb.cumsum(2)  # log β_0⋯β_r, (R,H,L,wb)
    d_beta = _lower_ratio(Bc.transpose(-1, -2), Bc.transpose(-1, -2), tokens[None, :] <= tokens[:, None])
    d_beta = d_beta.permute(0, 1, 3, 4, 2)  # (R,H,L,L,wb): [r, s]
    if factored:  # Σ_{r<n} as one product with the strict lower-triangular (L+1, L) ones (inv is 0 off active)
        strict = (tokens[None, :] < states[:, None]).to(inv.dtype)
        terms = inv[:, :, :, None] * d_beta  # (R,H,L,L,w): [r, s]
        coef = gamma[:, :, :, None] * (strict @ terms.flatten(-2)).view(*gamma.shape[:3], length, -1)
        carry = gamma * (strict @ (inv * Bc.exp()))
    else:
        d_alpha = _lower_ratio(G.transpose(-1, -2), G[:, :, 1:].transpose(-1, -2), lower[:, None, None])
        d_beta_cf = d_beta.permute(0, 1, 4, 2, 3)
        coef = (d_alpha @ d_beta_cf).permute(0, 1, 3, 4, 2)
        carry = (d_alpha @ Bc.exp().transpose(-1, -2)[..., None])[..., 0].transpose(-1, -2)
    return _Mix(gamma, coef=coef, carry=carry, beta_end=(Bc[:, :, -1:] - Bc).exp(), beta_all=Bc[:, :, -1].exp())


def _factorable(log_gamma: Tensor) -> bool:
    """Whether no segment's log Γ (R,H,L+1,w) falls so far that 1/Γ (and sums of L such terms) would leave
    the float range: a margin of e^10 below the largest float, so Γ_n and 1/Γ_{r+1} both stay normal."""
    length = log_gamma.shape[2] - 1
    limit = math.log(torch.finfo(log_gamma.dtype).max) - math.log(length + 1) - 10.0
    return bool(log_gamma[:, :, -1].min() >= -limit)


def _per_channel(x: Tensor, d: int) -> Tensor:
    """(…,w) -> (…,d): a coefficient per channel (w = 1 broadcast over the channels)."""
    return x.expand(*x.shape[:-1], d)


@dataclass
class _Pre:
    """The state-independent inputs of a segment, for a group of blocks (rows R = blocks × batch).

    q, k, v (R,H,L,d).  Reads (``online``/``before``; None for ``boundary``): qs = [Γ_τ ∘ q, c_τ ∘ q]
    (R,H,L,m·d), scores = -Σ_c X[τ,s,c] η_s k_s[c] q_τ[c] (R,H,L,L), weights = -η_s X[τ, s] (R,H,L,L) per
    head or (R,H,L,L,d) per channel, gamma, carry = Γ_τ, c_τ (R,H,L,w).  End of the block: scale =
    [Γ_L ; β_all] (R,H,m·d), carry_end = c_L (R,H,d), left = [-η_s X[L,s] ; -η_s β_{s+1}⋯] (R,H,L,m,d)
    (times δ_s: the W1 and M1 terms), right = the same times k_s (R,H,L,m·d).  dgd: kg = Γ_i ∘ k̂_i,
    solve = (I + diag(η) A)⁻¹ diag(-η), solve_u = solve · S_kk (R,H,L,L), dgd_scores (read), dgd_right.
    dgd(both), whose W1 system depends on the state: lr = η (R,H,L), own = X[i, r] (R,H,L,L,w) and
    own_gamma = Γ_i (R,H,L,w) for i < L, read_plain = X[τ, s] (as weights, without -η), end_plain = X[L, s].
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scale: Tensor
    left: Tensor
    right: Tensor
    carry_end: Tensor | None = None
    qs: Tensor | None = None
    scores: Tensor | None = None
    weights: Tensor | None = None
    gamma: Tensor | None = None
    carry: Tensor | None = None
    kg: Tensor | None = None
    solve: Tensor | None = None
    solve_u: Tensor | None = None
    dgd_scores: Tensor | None = None
    dgd_right: Tensor | None = None
    lr: Tensor | None = None
    own: Tensor | None = None
    own_gamma: Tensor | None = None
    read_plain: Tensor | None = None
    end_plain: Tensor | None = None

    def blocks(self, batch: int) -> list[_Pre]:
        """The blocks' views, one ``split`` per field: its backward is one concatenation, where slicing each
        block out would fill a zero gradient of the whole group per block."""
        parts = {f.name: _split(getattr(self, f.name), batch) for f in fields(self)}
        count = len(self.q) // batch
        views: list[dict[str, Any]] = [{n: None if x is None else x[i] for n, x in parts.items()} for i in range(count)]
        return [replace(self, **fields_of_block) for fields_of_block in views]


def _split(x: Tensor | None, size: int) -> tuple[Tensor, ...] | None:
    return None if x is None else x.split(size)


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    log_a: Tensor,
    log_b: Tensor | None,
    active: Tensor,
    cfg: MLPMemoryConfig,
) -> _Pre:
    """Every state-independent term of the segments ``active`` (R,L) of R blocks at once (see ``_Pre``)."""
    length, d = q.shape[2], q.shape[3]
    mix = _mixing(log_a, log_b, active)
    neg = -lr[..., None]  # (R,H,L,1): -η_s along the token axis
    left = [_per_channel(mix.rows(length) * neg, d)]
    scale = [_per_channel(mix.gamma[:, :, length], d)]
    carry_end = None
    if mix.beta_end is not None and mix.beta_all is not None and mix.carry is not None:
        left.append(_per_channel(mix.beta_end * neg, d))
        scale.append(_per_channel(mix.beta_all, d))
        carry_end = _per_channel(mix.carry[:, :, length], d)
    tau = None if cfg.read == "boundary" else slice(1, length + 1) if cfg.read == "online" else slice(0, length)
    pre = _Pre(
        q=q,
        k=k,
        v=v,
        scale=torch.cat(scale, -1),
        left=torch.stack(left, -2),
        right=torch.cat([c * k for c in left], -1),
        carry_end=carry_end,
    )
    if tau is not None:
        pre.gamma = mix.gamma[:, :, tau]
        pre.qs = pre.gamma * q
        if mix.carry is not None:
            pre.carry = mix.carry[:, :, tau]
            pre.qs = torch.cat([pre.qs, pre.carry * q], -1)
        pre.scores = mix.contract(tau, q, k) * -lr[:, :, None, :]
        weights = mix.rows(tau) * neg[:, :, None]  # (R,H,L,L,w)
        pre.weights = weights[..., 0] if weights.shape[-1] == 1 else weights
    if cfg.optimizer == "dgd":
        _prepare_dgd(pre, mix, lr, tau, cfg.dgd_both)
    return pre


def _prepare_dgd(pre: _Pre, mix: _Mix, lr: Tensor, tau: slice | None, both: bool) -> None:
    """dgd's W2 directions w solve (I + diag(η) A) w = -diag(η) (W2_e (Γ ∘ k̂) + S_kk u) per segment."""
    length, d = pre.k.shape[2], pre.k.shape[3]
    k_hat = torch.nn.functional.normalize(pre.k, dim=-1)
    own = slice(0, length)  # states 0..L-1: the state each token's factor multiplies
    pre.kg = mix.gamma[:, :, own] * k_hat
    A = mix.contract(own, k_hat, k_hat)
    eye = torch.eye(length, dtype=A.dtype, device=A.device).expand_as(A)
    inverse = torch.linalg.solve_triangular(eye + lr[..., None] * A, eye, upper=False, unitriangular=True)
    pre.solve = inverse * -lr[:, :, None, :]
    pre.solve_u = pre.solve @ (mix.contract(own, k_hat, pre.k) * -lr[:, :, None, :])
    pre.dgd_right = _per_channel(mix.rows(length), d) * k_hat
    if tau is not None:
        pre.dgd_scores = mix.contract(tau, pre.q, k_hat)
    if both:
        pre.lr, pre.own, pre.own_gamma = lr, mix.rows(own), mix.gamma[:, :, own]
        pre.end_plain = _per_channel(mix.rows(length), d)
        if tau is not None:
            plain = mix.rows(tau)
            pre.read_plain = plain[..., 0] if plain.shape[-1] == 1 else plain


# ---------------------------------------------------------------- the per-block step


def _step(
    W1s: Tensor,
    W2s: Tensor,
    P1: Tensor,
    P2: Tensor,
    pre: _Pre,
    cfg: MLPMemoryConfig,
    stop_delta: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One segment linearised at (P1, P2), entering with the stacked state [W1; M1], [W2 | M2].

    Returns the outputs (B,H,L,d) (meaningful at active tokens) and the stacked state after the block.
    """
    d = pre.q.shape[-1]
    delta, s, u = token_gradients(P1, P2, pre.k, pre.v, cfg)
    W2e = W2s[..., :d]
    w = None
    if pre.solve is not None and pre.kg is not None and pre.solve_u is not None:
        w = pre.solve @ (pre.kg @ W2e.transpose(-1, -2)) + pre.solve_u @ u
    hidden = None if pre.own is None else _dgd_hidden(W1s[:, :, :d], s, delta, pre)
    if pre.qs is None or pre.scores is None or pre.weights is None or pre.gamma is None:  # boundary read
        W1r, W2r = (P1, P2) if stop_delta is None else (P1 + stop_delta[0], P2 + stop_delta[1])
        p = activation(pre.q @ W2r.transpose(-1, -2), cfg.activation)
        z = p @ W1r.transpose(-1, -2)
    else:
        a = torch.baddbmm(
            (pre.scores @ u).flatten(0, 1), pre.qs.flatten(0, 1), W2s.flatten(0, 1).transpose(-1, -2)
        ).view(*u.shape)
        if w is not None and pre.dgd_scores is not None:
            a = a + pre.dgd_scores @ w
        if stop_delta is not None:
            a = a + pre.q @ stop_delta[1].transpose(-1, -2)
        p = activation(a, cfg.activation)
        zs = p @ W1s.transpose(-1, -2)  # (B,H,L,m·d): [W1_e p, M1_e p]
        z = pre.gamma * zs[..., :d]
        if pre.carry is not None:
            z = z + pre.carry * zs[..., d:]
        z = z + _mix_apply(pre.weights, p @ s.transpose(-1, -2), delta)
        if hidden is not None and pre.read_plain is not None:  # Σ_s X[τ, s] ∘ w1_s (ŝ_s·p_τ)
            s_hat, w1 = hidden
            z = z + _mix_apply(pre.read_plain, p @ s_hat.transpose(-1, -2), w1)
        if stop_delta is not None:
            z = z + p @ stop_delta[0].transpose(-1, -2)
    out = pre.q + output_map(z, cfg)

    # The state after the block: decayed entering state (+ c_L ∘ m_e) plus the token terms.
    left = (pre.left * delta[..., None, :]).flatten(-2)  # (B,H,L,m·d)
    base1 = W1s * pre.scale[..., None]
    base2 = W2s * pre.scale[..., None, :]
    if pre.carry_end is not None:
        base1[:, :, :d] += pre.carry_end[..., None] * W1s[:, :, d:]
        base2[..., :d] += pre.carry_end[..., None, :] * W2s[..., d:]
    # In place onto the fresh decayed states (baddbmm would first copy them).
    base1.flatten(0, 1).baddbmm_(left.flatten(0, 1).transpose(-1, -2), s.flatten(0, 1))
    base2.flatten(0, 1).baddbmm_(u.flatten(0, 1).transpose(-1, -2), pre.right.flatten(0, 1))
    if w is not None and pre.dgd_right is not None:
        base2.flatten(0, 1).baddbmm_(w.flatten(0, 1).transpose(-1, -2), pre.dgd_right.flatten(0, 1))
    if hidden is not None and pre.end_plain is not None:
        s_hat, w1 = hidden
        base1.flatten(0, 1).baddbmm_((pre.end_plain * w1).flatten(0, 1).transpose(-1, -2), s_hat.flatten(0, 1))
    return out, base1, base2


def _mix_apply(coef: Tensor, dots: Tensor, x: Tensor) -> Tensor:
    """Σ_s coef[τ, s] dots[τ, s] x_s: coef (B,H,L,L) per head or (B,H,L,L,d) per channel (then ∘ on c)."""
    if coef.dim() == 4:
        return (coef * dots) @ x
    return (dots[..., :, None, :] @ (coef * x[..., None, :, :]))[..., 0, :]  # one small product per query


def _dgd_hidden(W1e: Tensor, s: Tensor, delta: Tensor, pre: _Pre) -> tuple[Tensor, Tensor]:
    """dgd(both): (ŝ, w1) with w1_i = -η_i W1_i ŝ_i, the rank-one directions of W1's factor in the block.

    ŝ = s/‖s‖ comes from the chunk start, so the unit lower-triangular system is formed per block:
    (I + diag(η) (X ∘ ŜŜᵀ)) w1 = -diag(η) (Γ ∘ W1_e ŝ + Σ_r X[i, r] (-η_r) (ŝ_i·s_r) δ_r), one per channel
    when the rates are per channel (X[i, r] then differs per output channel of W1).
    """
    assert pre.own is not None and pre.own_gamma is not None and pre.lr is not None
    s_hat = torch.nn.functional.normalize(s, dim=-1)
    eta = pre.lr
    own = pre.own[..., 0] if pre.own.shape[-1] == 1 else pre.own
    rhs = pre.own_gamma * (s_hat @ W1e.transpose(-1, -2))
    rhs = -eta[..., None] * (rhs + _mix_apply(_eta_cols(own, eta), s_hat @ s.transpose(-1, -2), delta))
    pairs = s_hat @ s_hat.transpose(-1, -2)
    length = s.shape[2]
    eye = torch.eye(length, dtype=s.dtype, device=s.device)
    if own.dim() == 4:
        system = eye + eta[..., None] * (own * pairs)
        return s_hat, torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    system = eye + eta[:, :, None, :, None] * (own.permute(0, 1, 4, 2, 3) * pairs[:, :, None])
    w1 = torch.linalg.solve_triangular(system, rhs.transpose(-1, -2)[..., None], upper=False, unitriangular=True)
    return s_hat, w1[..., 0].transpose(-1, -2)


def _eta_cols(coef: Tensor, eta: Tensor) -> Tensor:
    """coef[i, r] · (-η_r): coef (B,H,L,L) or (B,H,L,L,d), η (B,H,L)."""
    scale = -eta[:, :, None, :]
    return coef * (scale if coef.dim() == 4 else scale[..., None])


# ---------------------------------------------------------------- blocks and phases


def _block_major(x: Tensor, blocks: int, chunk: int) -> Tensor:
    """(B,H,T,...) -> (N·B,H,C,...) zero-padded to N·C tokens; block n is rows n·B..(n+1)·B."""
    batch, heads, steps = x.shape[:3]
    pad = blocks * chunk - steps
    if pad:
        x = torch.cat([x, x.new_zeros(batch, heads, pad, *x.shape[3:])], 2)
    x = x.reshape(batch, heads, blocks, chunk, *x.shape[3:]).movedim(2, 0)
    return x.reshape(blocks * batch, heads, chunk, *x.shape[4:])


@dataclass
class _Schedule:
    """Which tokens of each block belong to the carried chunk (stage A) or to a chunk started in the block
    (stage B), per row; all of it follows from the phases and lengths, not from the state.

    stage_a, stage_b (N·B,L) block-major; opens, cut (N,B); phase, done after the call (B,)."""

    stage_a: Tensor
    stage_b: Tensor
    opens: Tensor
    cut: Tensor | None
    phase: Tensor
    done: Tensor


def _pad_time(mask: Tensor, pad: int) -> Tensor:
    """A (B,T) bool mask with ``pad`` False tokens appended."""
    return torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1) if pad else mask


def _schedule(
    phase0: Tensor, done0: Tensor, valid: Tensor, cuts: Tensor | None, blocks: int, chunk: int, block: int = 0
) -> _Schedule:
    """The stage masks of every block from the phases (B,) and chunk counts (B,) at the call's start.
    Blocks hold ``block`` ≤ ``chunk`` tokens (default ``chunk``), so each holds at most one chunk start."""
    batch, steps = valid.shape
    block = block or chunk
    pad = blocks * block - steps
    live = _pad_time(valid, pad).view(batch, blocks, block)
    counts = live.sum(2)
    phase = (phase0[:, None] + counts.cumsum(1) - counts) % chunk  # (B,N) at each block's start
    first = ((chunk - phase) % chunk)[..., None]  # local index of the (at most one) chunk start (≥ block: none)
    local = torch.arange(block, device=valid.device)
    stage_a, stage_b = live & (local < first), live & (local >= first)
    opens = stage_b.any(2)
    cut = None
    if cuts is not None:
        padded = _pad_time(cuts, pad).view(batch, blocks, block)
        cut = padded.gather(2, first.clamp(max=block - 1))[..., 0] & opens
        cut = cut.t()
    offset = phase0 + counts.sum(1)

    def major(x: Tensor) -> Tensor:
        return x.transpose(0, 1).reshape(blocks * batch, block)

    return _Schedule(major(stage_a), major(stage_b), opens.t(), cut, offset % chunk, done0 + offset // chunk)


def _where_rows(rows: Tensor, a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    mask = rows.view(-1, 1, 1, 1)
    return tuple(torch.where(mask, x, y) for x, y in zip(a, b))


def _masked(active: Tensor, x: Tensor, fill: float = 0.0) -> Tensor:
    """x (R,H,L) or (R,H,L,d) with the tokens outside ``active`` (R,L) set to ``fill``."""
    if bool(active.all()):  # nothing to mask: no copy, no backward node
        return x
    mask = active[:, None, :, None] if x.dim() == 4 else active[:, None]
    return torch.where(mask, x, torch.full_like(x, fill))


def _stack(a: Tensor, b: Tensor | None, dim: int) -> Tensor:
    return a if b is None else torch.cat([a, b], dim)


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
    batch, _, steps, d = q.shape
    if steps == 0:
        return q.new_zeros(q.shape), state
    device, chunk = q.device, cfg.chunk
    every_token = lengths is None or bool((lengths >= steps).all())
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=device)
    valid = torch.arange(steps, device=device)[None, :] < lengths[:, None]
    use_momentum = cfg.optimizer == "momentum_gd" and momentum is not None

    carry = state
    stop_delta = None
    if cfg.grad == "stop":
        k, v, lr, retain = k.detach(), v.detach(), lr.detach(), retain.detach()
        momentum = None if momentum is None else momentum.detach()
        carry = state.detach()
        start1, start2 = init_rows(state.init1, batch), init_rows(state.init2, batch)
        stop_delta = (start1 - start1.detach(), start2 - start2.detach())
    cuts = truncation_mask(state.phase, state.chunks_done, cfg, steps) & valid if cfg.grad == "truncate" else None
    # A call shorter than a chunk runs as one block of its own length (a block needs at most one chunk
    # start, not C tokens: padding it to C would only add inactive tokens).
    block = min(chunk, steps)
    blocks = -(-steps // block)
    plan = _schedule(state.phase, state.chunks_done, valid, cuts, blocks, chunk, block)
    has_a = plan.stage_a.view(blocks, batch, block).any(2).any(1).tolist()
    all_open = plan.opens.all(1).tolist()
    any_open = plan.opens.any(1).tolist()
    full_b = plan.stage_b.view(blocks, batch * block).all(1).tolist()
    cut_any = plan.cut.any(1).tolist() if plan.cut is not None else [False] * blocks

    # Inputs block-major (N·B,H,C,·); logs of the rates; padding tokens inactive.
    qb, kb, vb, lrb = (_block_major(x, blocks, block) for x in (q, k, v, lr))
    lab = _block_major(safe_log(retain), blocks, block)
    lbb = _block_major(safe_log(momentum), blocks, block) if use_momentum and momentum is not None else None

    group = max(1, GROUP_TOKENS // block)
    # Groups as views from one split per input (one concatenation in the backward, as for the blocks).
    grouped = [None if x is None else x.split(group * batch) for x in (qb, kb, vb, lrb, lab, lbb)]

    def prepare(index: int, active: Tensor) -> list[_Pre]:
        act = active.split(group * batch)[index]
        qg, kg, vg, lrg, lag, lbg = (None if x is None else x[index] for x in grouped)
        assert qg is not None and kg is not None and vg is not None and lrg is not None and lag is not None
        masked_b = None if lbg is None else _masked(act, lbg)
        pre = _prepare(qg, kg, vg, _masked(act, lrg), _masked(act, lag), masked_b, act, cfg)
        return pre.blocks(batch)

    step = _step_fn(cfg)
    W1, W2, P1, P2, M1, M2 = carry.tensors()
    W1s = _stack(W1, M1 if use_momentum else None, 2)
    W2s = _stack(W2, M2 if use_momentum else None, 3)
    outputs = []
    for g0 in range(0, blocks, group):
        g1 = min(blocks, g0 + group)
        rows = slice(g0 * batch, g1 * batch)
        pre_b = prepare(g0 // group, plan.stage_b) if any(any_open[g0:g1]) else None
        pre_a = prepare(g0 // group, plan.stage_a) if any(has_a[g0:g1]) else None
        for n in range(g0, g1):
            mine = slice((n - g0) * batch, (n - g0 + 1) * batch)
            out = q.new_zeros(batch, q.shape[1], block, d) if not full_b[n] else None
            if has_a[n] and pre_a is not None and out is not None:
                out_a, W1s, W2s = step(W1s, W2s, P1, P2, pre_a[n - g0], cfg, stop_delta)
                out = torch.where(plan.stage_a[rows][mine][:, None, :, None], out_a, out)
            if any_open[n] and pre_b is not None:
                if plan.cut is not None and cut_any[n]:
                    W1s, W2s = _where_rows(plan.cut[n], (W1s.detach(), W2s.detach()), (W1s, W2s))
                if all_open[n]:
                    P1, P2 = W1s[:, :, :d], W2s[..., :d]
                else:
                    P1, P2 = _where_rows(plan.opens[n], (W1s[:, :, :d], W2s[..., :d]), (P1, P2))
                out_b, W1s, W2s = step(W1s, W2s, P1, P2, pre_b[n - g0], cfg, stop_delta)
                out = out_b if out is None else torch.where(plan.stage_b[rows][mine][:, None, :, None], out_b, out)
            assert out is not None
            outputs.append(out)

    o = torch.cat(outputs, dim=2)[:, :, :steps]
    W1, W2 = W1s[:, :, :d].contiguous(), W2s[..., :d].contiguous()
    if use_momentum:
        M1, M2 = W1s[:, :, d:].contiguous(), W2s[..., d:].contiguous()
    P1, P2 = P1.contiguous(), P2.contiguous()
    if stop_delta is not None:
        W1, W2 = W1 + stop_delta[0], W2 + stop_delta[1]
        P1, P2 = P1 + stop_delta[0], P2 + stop_delta[1]
    if not every_token:
        o = torch.where(valid[:, None, :, None], o, torch.zeros_like(o))
    new_state = MLPMemoryState(W1, W2, P1, P2, plan.phase, plan.done, state.init1, state.init2, M1, M2)
    return o, new_state

"""Block-parallel implementation of a matrix-memory level (the fast path).

Tokens are processed in blocks of at most ``block`` tokens; inside a block everything is computed
in parallel with matrix products.  With the carried state S_0 and local token indices 1..L, write
Γ_t = α_1⋯α_t (Γ_0 = 1).  Every state of the block has the form

    S_t = Γ_t S_0 + Σ_{s≤t} (Γ_t/Γ_s) w_s k_sᵀ,

with w_s = η_s v_s ("dot") or w_s = -η_s (P_s k_s - v_s) ("l2").  For "l2" the linearisation point
of a token whose chunk starts inside the block at b(s) is ρ_s S_{b(s)-1}; expanding that state with
the formula above gives a unit lower-triangular system (the WY/UT form of the chunked delta rule)

    (I + diag(η) A) W = diag(η) (V - diag(λ) K S_0ᵀ),
    A_{sr} = [r < b(s)] (λ_s/Γ_r) (k_s·k_r),   λ_s = Γ_s ("before") or Γ_{b(s)-1} ("after").

Tokens continuing a chunk opened before the block use the carried P (and log_decay) instead and
are not coupled.  Reads are o_t = S_τ q_t = Γ_τ S_0 q_t + Σ_{s≤τ} (Γ_τ/Γ_s)(k_s·q_t) w_s.

Indexing convention in this file: tokens of a block are 0-based (i = 0..L-1) and the state after
token i has state index i+1, so state index 0 is the carried S_0.  All decay ratios Γ_a/Γ_b are
evaluated as exp(log Γ_a - log Γ_b) under a mask a ≥ b, hence never overflow.

Objectives "lp" and "huber" (e = sign(r)|r|^{p-1} or clamp(r, -δ, δ), w_s = -η_s e(ρ_s S_{b(s)-1} k_s - v_s))
are not linear in the state, so there is no triangular system: ``_nonlinear_updates`` walks the chunk
starts of the block in order, forms each chunk's start state S_{b-1} from the w of the earlier chunks
(the expansion above), and computes the w of all the chunk's tokens at once.  That is parallel inside
a chunk and sequential over chunks (one step per token at C = 1); reads and the carry are unchanged.

A per-channel retention α (B,H,T,dk) (S ← S·diag(α), GLA-style) keeps every formula with Γ a vector
over the key channels: Γ_t S_0 becomes S_0·diag(Γ_t) and a score (Γ_τ/Γ_s)(k_s·q) becomes
Σ_c (Γ_τ[c]/Γ_s[c]) k_s[c] q[c], evaluated as an explicit (L, L, dk) tensor of masked ratios ≤ 1 (no
split into Γ_τ q and k/Γ_s, which would overflow; nothing is clamped).

"dgd" (S_t = S_{t-1}(α_t I - η_t k_t k_tᵀ) - η_t e_t k_tᵀ, e = -v for "dot", P k - v for "l2") is the
delta rule with w_i = -η_i (S_{i-1} k_i + e_i): the term S_{i-1} k_i couples token i to every earlier
token of the block (plus, for "l2", the chunk-start term above), so W again solves one unit
lower-triangular system per block; with a per-channel α the factor is diag(α_t) - η_t k_t k_tᵀ.

An output map (M(x) = [x +] [LN](S x), ``memory_maps``) makes δ non-linear in the state: "gd" then takes
the chunk-by-chunk ``_nonlinear_updates`` path, and the map is applied to every read at the end.

Scope of the parallel form: optimizer "gd" (any objective) and "dgd" ("dot" and "l2"), with α per head
or per channel; "momentum_gd" at C ≥ 2 with decay after goes to ``momentum.chunked_momentum``.  Every
other combination ("momentum_gd" otherwise, "newton_schulz", "delta_momentum", "dgd" with
"lp"/"huber", a per-head α fed to a stream whose carried decay is per channel) runs through
``_scan_fallback``: the documented compiled-scan fallback of DESIGN §3, the reference step per token run
in ``torch.compile``d blocks of unrolled steps (``runtime/ops/compiled_scan.py``) behind the same API
(the oracle's results and gradients, no parallelism over tokens); so does a windowed objective with an
optimizer other than "gd" (``memory_maps.run_memory``).
("newton_schulz" maps the momentum through a non-linear NS_steps every token, and "delta_momentum"'s
factor (αI - λĝᵀĝ) multiplies the momentum, not the state, so the state is a sum of products of those
factors: neither has an exact block form implemented here.)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import compiled_scan
from ..memory_maps import gradient_signal, memory_output
from . import reference
from .momentum import chunked_momentum, has_momentum_form
from .state import (
    MatrixMemoryConfig,
    MatrixMemoryState,
    init_rows,
    objective_residual,
    safe_log_retain,
    truncation_mask,
)


@dataclass
class _Block:
    """Per-block quantities shared by the solve, the reads and the carry.

    G: (B,H,L+1) log Γ at state indices 0..L.
    lin_idx: (B,L) state index of each token's chunk-start state S_{b-1} (negative: chunk opened
        before the block, the carried P applies).
    src: (L,) state index i+1 at which token i's contribution w_i k_iᵀ enters.
    """

    G: Tensor
    lin_idx: Tensor
    src: Tensor


def _gather_log_gamma(G: Tensor, idx: Tensor) -> Tensor:
    """log Γ at per-row state indices: G (B,H,L+1[,dk]), idx (B,n) -> (B,H,n[,dk])."""
    batch, heads = G.shape[:2]
    if G.dim() == 4:
        index = idx[:, None, :, None].expand(batch, heads, idx.shape[1], G.shape[3])
        return G.gather(2, index)
    return G.gather(2, idx[:, None, :].expand(batch, heads, idx.shape[1]))


def _decay_ratio(G: Tensor, hi: Tensor, lo: Tensor, mask: Tensor) -> Tensor:
    """Γ_hi / Γ_lo where mask else 0: hi (B,n), lo (B,m) or (m,), mask (B,n,m) -> (B,H,n,m[,dk]).

    Callers guarantee hi ≥ lo under the mask, so the ratio is ≤ 1 and exp never overflows; masked
    entries go through exp(-inf) = 0, which has a zero (not NaN) gradient.  A per-channel G
    (B,H,L+1,dk) gives one ratio per key channel (trailing axis).
    """
    log_hi = _gather_log_gamma(G, hi)
    if lo.dim() == 1:
        log_lo = G[:, :, lo]
    else:
        log_lo = _gather_log_gamma(G, lo)
    if G.dim() == 4:
        diff = log_hi[..., :, None, :] - log_lo[..., None, :, :]
        return torch.where(mask[:, None, :, :, None], diff, float("-inf")).exp()
    diff = log_hi[..., :, None] - log_lo[..., None, :]
    return torch.where(mask[:, None], diff, float("-inf")).exp()


def _weighted_dots(ratio: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Σ_c ratio[n, m, c] a_n[c] b_m[c] (per channel) or ratio[n, m] (a_n·b_m): (B,H,n,m)."""
    if ratio.dim() == 5:
        return (ratio * (a[..., :, None, :] * b[..., None, :, :])).sum(-1)
    return ratio * (a @ b.transpose(-1, -2))


def _scaled(gamma: Tensor, x: Tensor) -> Tensor:
    """γ_n ∘ x_n on the key channels: gamma (B,H,n) or (B,H,n,dk), x (B,H,n,dk)."""
    return gamma * x if gamma.dim() == x.dim() else gamma[..., None] * x


def _state_at(blk: _Block, S0: Tensor, W: Tensor, k: Tensor, idx: Tensor) -> Tensor:
    """S_idx = S_0 ∘ Γ_idx + Σ_{i+1≤idx} w_i (Γ_idx/Γ_{i+1} ∘ k_i)ᵀ for a per-row index idx (B,)."""
    hi = idx[:, None]
    coef = _decay_ratio(blk.G, hi, blk.src, blk.src[None, None, :] <= hi[:, :, None])[:, :, 0]
    gamma = _gather_log_gamma(blk.G, hi)[:, :, 0].exp()
    start = S0 * gamma[..., None, :] if gamma.dim() == 3 else gamma[..., None, None] * S0
    return start + W.transpose(-1, -2) @ _scaled(coef, k)


def _carried_base(blk: _Block, k: Tensor, carry: MatrixMemoryState, cfg: MatrixMemoryConfig) -> Tensor:
    """ρ_i P k_i for tokens continuing the carried chunk: ρ_i = 1 ("after") or α_b⋯α_i ("before")."""
    if cfg.decay == "before":
        log_decay = carry.log_decay
        if blk.G.dim() == 4 and log_decay.dim() == 2:
            log_decay = log_decay[..., None]
        rho = (log_decay[..., None, :] if blk.G.dim() == 4 else log_decay[..., None]) + blk.G[:, :, 1:]
        return _scaled(rho.exp(), k) @ carry.P.transpose(-1, -2)
    return k @ carry.P.transpose(-1, -2)


def _solve_updates(
    blk: _Block, k: Tensor, v: Tensor, lr: Tensor, carry: MatrixMemoryState, cfg: MatrixMemoryConfig
) -> Tensor:
    """The update directions W (B,H,L,dv): w_i = η_i v_i ("dot" with "gd"), else from a UT system.

    "gd" + "l2": w_i = η_i (v_i - ρ_i S_{b(i)-1} k_i).  "dgd": w_i = -η_i (S_{i-1} k_i + e_i) with
    e_i = -v_i ("dot") or S_{b(i)-1} k_i - v_i ("l2"): the state before the token (the factor
    (α I - η k kᵀ)) couples every token to all earlier ones, as in the delta rule.
    """
    dgd = cfg.optimizer == "dgd"
    if cfg.residual or cfg.norm:  # an output map: δ is not linear in the state
        return _nonlinear_updates(blk, k, v, lr, carry, cfg)
    if cfg.objective == "dot" and not dgd:
        return lr[..., None] * v
    if cfg.objective not in ("dot", "l2"):
        return _nonlinear_updates(blk, k, v, lr, carry, cfg)
    in_block = blk.lin_idx >= 0
    lin_idx = blk.lin_idx.clamp_min(0)
    batch, length = lin_idx.shape
    own = blk.src.expand(batch, length)
    base = torch.zeros_like(v)
    A = None
    if cfg.objective == "l2":
        # λ_i: the decay that maps S_0 to token i's linearisation point (through S_{b-1}).
        lam_idx = lin_idx if cfg.decay == "after" else own
        lam = _gather_log_gamma(blk.G, lam_idx).exp()
        base_in = _scaled(lam, k) @ carry.S.transpose(-1, -2)
        base = torch.where(in_block[:, None, :, None], base_in, _carried_base(blk, k, carry, cfg))
        # Token i couples to token r iff r's contribution is already in S_{b(i)-1}: r+1 ≤ lin_idx(i).
        couple = blk.src[None, None, :] <= blk.lin_idx[:, :, None]
        A = _weighted_dots(_decay_ratio(blk.G, lam_idx, blk.src, couple), k, k)
    if dgd:
        # The state before token i, S_{i}: Γ_i S_0 and every earlier token of the block.
        before = own - 1
        gamma = _gather_log_gamma(blk.G, before).exp()
        base = base + _scaled(gamma, k) @ carry.S.transpose(-1, -2)
        earlier = blk.src[None, None, :] <= before[:, :, None]
        A_own = _weighted_dots(_decay_ratio(blk.G, before, blk.src, earlier), k, k)
        A = A_own if A is None else A + A_own
    assert A is not None
    rhs = lr[..., None] * (v - base)
    eye = torch.eye(length, dtype=k.dtype, device=k.device)
    system = eye + lr[..., None] * A
    return torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)


def _nonlinear_updates(
    blk: _Block, k: Tensor, v: Tensor, lr: Tensor, carry: MatrixMemoryState, cfg: MatrixMemoryConfig
) -> Tensor:
    """W for "lp" / "huber": w_i = -η_i e(ρ_i S_{b(i)-1} k_i - v_i), chunk by chunk (module docstring).

    Tokens continuing the carried chunk linearise at the carried P (ρ_i = 1, or its decay for
    "before"); the others at S_j, j = lin_idx(i), which only involves tokens before j (already done).
    """
    batch, length = blk.lin_idx.shape

    def update(base: Tensor) -> Tensor:
        if cfg.residual or cfg.norm:  # base is z = S k; δ = ∂ℓ/∂z through the output map
            signal = gradient_signal(base, lambda y: _error(y, v, cfg), k, cfg.residual, cfg.norm, cfg.ln_eps)
            return -lr[..., None] * signal
        return -lr[..., None] * objective_residual(base - v, cfg.objective, cfg.p, cfg.delta)

    in_block = blk.lin_idx >= 0
    base_out = _carried_base(blk, k, carry, cfg)
    W = torch.where(in_block[:, None, :, None], torch.zeros_like(base_out), update(base_out))
    for j in sorted(set(blk.lin_idx[in_block].tolist())):
        idx = torch.full((batch,), j, dtype=torch.int64, device=k.device)
        keys = k
        if cfg.decay == "before":
            # ρ_i = α_b⋯α_i = Γ_{i+1}/Γ_j (i+1 > j for every token of the chunk, so ≤ 1).
            keys = _scaled((blk.G[:, :, 1:] - blk.G[:, :, j : j + 1]).clamp_max(0).exp(), k)
        base = keys @ _state_at(blk, carry.S, W, k, idx).transpose(-1, -2)
        mine = (blk.lin_idx == j)[:, None, :, None]
        W = torch.where(mine, update(base), W)
    return W


def _error(y: Tensor, v: Tensor, cfg: MatrixMemoryConfig) -> Tensor:
    """e = ∂ℓ/∂M(k) at the memory's output y."""
    return -v if cfg.objective == "dot" else objective_residual(y - v, cfg.objective, cfg.p, cfg.delta)


def _read(blk: _Block, q: Tensor, k: Tensor, W: Tensor, carry: MatrixMemoryState, cfg: MatrixMemoryConfig) -> Tensor:
    """o_i = S_τ q_i = S_0 (Γ_τ ∘ q_i) + Σ_{r+1≤τ} ((Γ_τ/Γ_{r+1}) ∘ k_r · q_i) w_r, τ per the read mode."""
    batch, length = blk.lin_idx.shape
    own = blk.src.expand(batch, length)
    if cfg.read == "online":
        tau = own
    elif cfg.read == "before":
        tau = own - 1
    else:
        tau = blk.lin_idx.clamp_min(0)
    visible = blk.src[None, None, :] <= tau[:, :, None]
    scores = _weighted_dots(_decay_ratio(blk.G, tau, blk.src, visible), q, k)
    gamma = _gather_log_gamma(blk.G, tau).exp()
    out = _scaled(gamma, q) @ carry.S.transpose(-1, -2) + scores @ W
    if cfg.read == "boundary":
        # A chunk opened before the block was read at its start state, the carried P.
        carried = q @ carry.P.transpose(-1, -2)
        out = torch.where((blk.lin_idx >= 0)[:, None, :, None], out, carried)
    return out


def _carry(
    blk: _Block, k: Tensor, W: Tensor, carry: MatrixMemoryState, consumed: Tensor, cfg: MatrixMemoryConfig
) -> MatrixMemoryState:
    """State after each row's last consumed token of the block (consumed: (B,) in 0..L)."""
    S = _state_at(blk, carry.S, W, k, consumed)
    last = (consumed - 1).clamp_min(0)[:, None]
    lin_last = blk.lin_idx.gather(1, last)[:, 0]
    # The last token's chunk opened inside the block: P = S_{b-1} and log_decay = log Γ_e - log Γ_{b-1}.
    # Otherwise (or if nothing was consumed) the carried chunk continues: P unchanged, decay grows.
    opened_here = (consumed > 0) & (lin_last >= 0)
    lin_last = lin_last.clamp_min(0)
    P = torch.where(opened_here[:, None, None, None], _state_at(blk, carry.S, W, k, lin_last), carry.P)
    log_end = _gather_log_gamma(blk.G, consumed[:, None])[:, :, 0]
    log_start = _gather_log_gamma(blk.G, lin_last[:, None])[:, :, 0]
    carried = carry.log_decay
    if log_end.dim() == 3 and carried.dim() == 2:
        carried = carried[..., None].expand(*log_end.shape)
    opened = opened_here[:, None, None] if log_end.dim() == 3 else opened_here[:, None]
    log_decay = torch.where(opened, log_end - log_start, carried + log_end)
    offset = carry.phase + consumed
    return MatrixMemoryState(
        S=S,
        P=P,
        log_decay=log_decay,
        phase=offset % cfg.chunk,
        chunks_done=carry.chunks_done + offset // cfg.chunk,
        init=carry.init,
        momentum=carry.momentum,
    )


def _run_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    log_retain: Tensor,
    carry: MatrixMemoryState,
    consumed: Tensor,
    cfg: MatrixMemoryConfig,
) -> tuple[Tensor, MatrixMemoryState]:
    """Outputs (B,H,L,dv) of one block and the carry after it; padded tokens have η = 0, α = 1."""
    length = q.shape[2]
    local = torch.arange(length, device=q.device)
    in_chunk = (carry.phase[:, None] + local) % cfg.chunk
    G = torch.nn.functional.pad(log_retain.cumsum(2), (0, 0, 1, 0) if log_retain.dim() == 4 else (1, 0))
    blk = _Block(G=G, lin_idx=local - in_chunk, src=local + 1)
    W = _solve_updates(blk, k, v, lr, carry, cfg)
    return _read(blk, q, k, W, carry, cfg), _carry(blk, k, W, carry, consumed, cfg)


def _block_bounds(steps: int, block: int, cuts: Tensor | None) -> list[int]:
    """Block start positions: multiples of ``block`` plus every truncation point, and ``steps``."""
    bounds = set(range(0, steps, block))
    if cuts is not None:
        bounds.update(torch.nonzero(cuts.any(0)).flatten().tolist())
    return sorted(bounds) + [steps]


def _detach_rows(state: MatrixMemoryState, rows: Tensor) -> MatrixMemoryState:
    """Detach S and P (the whole state) of the selected rows only."""
    cut = rows.view(-1, 1, 1, 1)
    return MatrixMemoryState(
        S=torch.where(cut, state.S.detach(), state.S),
        P=torch.where(cut, state.P.detach(), state.P),
        log_decay=state.log_decay,
        phase=state.phase,
        chunks_done=state.chunks_done,
        init=state.init,
        momentum=state.momentum,
    )


def _with_init_gradient(state: MatrixMemoryState, delta: Tensor, init: Tensor) -> MatrixMemoryState:
    """Add δ = θ_init - sg(θ_init) (zero-valued) so that states carry the "stop" gradient to θ_init."""
    return MatrixMemoryState(
        S=state.S + delta,
        P=state.P + delta,
        log_decay=state.log_decay,
        phase=state.phase,
        chunks_done=state.chunks_done,
        init=init,
        momentum=state.momentum,
    )


def has_parallel_form(cfg: MatrixMemoryConfig, retain: Tensor, state: MatrixMemoryState) -> bool:
    """Whether ``chunked`` runs block-parallel (True) or through the scan fallback (False).

    Parallel: "gd" (any objective) and "dgd" ("dot", "l2"), with α per head or per channel.  A
    stream whose carried decay is per channel stays on the scan when fed a per-head α.
    """
    linear_dgd = cfg.optimizer == "dgd" and cfg.objective in ("dot", "l2") and not (cfg.residual or cfg.norm)
    if cfg.window > 1 or (cfg.optimizer != "gd" and not linear_dgd):
        return False
    return retain.dim() == 4 or state.log_decay.dim() == 2


def _scan_fallback(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    state: MatrixMemoryState,
    cfg: MatrixMemoryConfig,
    lengths: Tensor | None,
    momentum: Tensor | None,
) -> tuple[Tensor, MatrixMemoryState]:
    """The compiled-scan fallback (DESIGN §3): ``reference.step`` per token, in compiled blocks.

    Used where no parallel form is implemented; each token runs the reference step itself (through
    ``compiled_scan``), so outputs, states and gradients are those of the oracle.
    """
    if q.shape[2] == 0:
        return reference.scan(q, k, v, lr, retain, state, cfg, lengths=lengths, momentum=momentum)
    log_decay = state.log_decay
    if retain.dim() == 4 and log_decay.dim() == 2:
        # The step widens a per-head carried decay at the first per-channel α; doing it up front keeps
        # the carry's shape fixed through the scan (the values are the same).
        log_decay = log_decay[..., None].expand(*retain.shape[:2], retain.shape[3])
    valid = compiled_scan.valid_tokens(lengths, q.shape[2])
    carry = (state.S, state.P, log_decay, state.phase, state.chunks_done, state.momentum)
    inputs = (q, k, v, lr, retain, valid, momentum)
    o, after = compiled_scan.scan(_scan_step, carry, inputs, (state.init,), cfg)
    S, P, log_decay, phase, done, m = after
    return o, MatrixMemoryState(S, P, log_decay, phase, done, init=state.init, momentum=m)


def _scan_step(
    carry: tuple[Tensor, ...], inputs: tuple[Tensor | None, ...], consts: tuple[Tensor, ...], cfg: MatrixMemoryConfig
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``reference.step`` on flat tensors (the form ``compiled_scan`` threads through a block)."""
    S, P, log_decay, phase, chunks_done, m = carry
    q_t, k_t, v_t, lr_t, retain_t, valid_t, beta_t = inputs
    state = MatrixMemoryState(
        S=S, P=P, log_decay=log_decay, phase=phase, chunks_done=chunks_done, init=consts[0], momentum=m
    )
    assert q_t is not None and k_t is not None and v_t is not None and lr_t is not None and retain_t is not None
    valid = None if valid_t is None else valid_t[:, 0]
    o_t, new = reference.step(state, q_t, k_t, v_t, lr_t, retain_t, cfg, valid, beta_t)
    return o_t, (new.S, new.P, new.log_decay, new.phase, new.chunks_done, new.momentum)


def chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    state: MatrixMemoryState,
    cfg: MatrixMemoryConfig,
    lengths: Tensor | None = None,
    block: int = 64,
    momentum: Tensor | None = None,
) -> tuple[Tensor, MatrixMemoryState]:
    """Same contract as ``reference.scan``, computed block-parallel (no loop over tokens).

    q, k: (B,H,T,dk); v: (B,H,T,dv); lr: (B,H,T); retain: (B,H,T) or (B,H,T,dk) per channel;
    lengths: (B,) int64 or None; momentum: β (B,H,T) or (B,H,T,dk), for "momentum_gd".
    Returns o (B,H,T,dv) and the state after each row's last valid token.
    Combinations outside the parallel form run the scan fallback (see the module docstring).
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if momentum is not None and has_momentum_form(cfg, retain, momentum, state):
        return chunked_momentum(q, k, v, lr, retain, state, cfg, lengths, momentum)
    if not has_parallel_form(cfg, retain, state):
        return _scan_fallback(q, k, v, lr, retain, state, cfg, lengths, momentum)
    batch, _, steps, _ = q.shape
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=q.device)
    valid = torch.arange(steps, device=q.device)[None, :] < lengths[:, None]

    stop = cfg.grad == "stop"
    carry = state
    if stop:
        # Nothing but q and θ_init receives gradients; θ_init's is restored by δ below.
        k, v, lr, retain = k.detach(), v.detach(), lr.detach(), retain.detach()
        carry = state.detach()
    # Padding: η = 0 and α = 1 make a token a no-op on the state.
    lr = torch.where(valid[:, None], lr, torch.zeros_like(lr))
    time_mask = valid[:, None, :, None] if retain.dim() == 4 else valid[:, None]
    log_retain = torch.where(time_mask, safe_log_retain(retain), torch.zeros_like(retain))

    cuts = None
    if cfg.grad == "truncate":
        cuts = truncation_mask(state.phase, state.chunks_done, cfg, steps) & valid
    bounds = _block_bounds(steps, block, cuts)

    outputs = []
    for start, end in itertools.pairwise(bounds):
        if cuts is not None:
            carry = _detach_rows(carry, cuts[:, start])
        consumed = (lengths - start).clamp(0, end - start)
        out, carry = _run_block(
            q[:, :, start:end],
            k[:, :, start:end],
            v[:, :, start:end],
            lr[:, :, start:end],
            log_retain[:, :, start:end],
            carry,
            consumed,
            cfg,
        )
        outputs.append(out)
    o = torch.cat(outputs, dim=2) if outputs else q.new_zeros(*q.shape[:3], v.shape[-1])

    if stop:
        start_state = init_rows(state.init, batch)
        delta = start_state - start_state.detach()
        # θ_τ = θ_init + sg(θ_τ - θ_init) for every read state, so o_t gains δ q_t.
        o = o + q @ delta.transpose(-1, -2)
        carry = _with_init_gradient(carry, delta, state.init)
    if cfg.residual or cfg.norm:
        o = memory_output(o, q, cfg.residual, cfg.norm, cfg.ln_eps)
    o = torch.where(valid[:, None, :, None], o, torch.zeros_like(o))
    return o, carry

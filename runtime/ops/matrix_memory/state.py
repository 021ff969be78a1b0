"""Configuration and carried state of a matrix-memory level.

A matrix memory keeps, per batch row ``b`` and head ``h``, a state matrix ``S ∈ R^{dv×dk}`` that is
updated once per token by one step of gradient descent on an inner objective (see ``reference.py``
for the exact semantics).  The state carried between calls is everything needed to make streaming
exact: the current state, the chunk-start linearisation point, the accumulated in-chunk decay, and
the position of the stream relative to the chunk and truncation grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

OBJECTIVES = ("dot", "l2", "lp", "huber")
DECAYS = ("after", "before")
READS = ("online", "before", "boundary")
GRADS = ("through", "stop", "truncate")
OPTIMIZERS = ("gd", "momentum_gd", "dgd", "newton_schulz", "delta_momentum")

# ε of delta_momentum's normalised gradient ĝ = g / (‖g‖_F + ε) (DESIGN §5, Eq. 48-49).
DELTA_MOMENTUM_EPS = 1e-8

# Smallest retention used inside logarithms: log(1e-30) ≈ -69 keeps every cumulative sum finite
# (no -inf - -inf) while making exp() of it indistinguishable from 0 at the precisions we use.
_MIN_RETAIN = 1e-30


@dataclass(frozen=True)
class MatrixMemoryConfig:
    """Static configuration of one matrix-memory level.

    objective: with the residual r = S k - v and ℓ's derivative e = ∂ℓ/∂(S k) (``objective_residual``):
        "dot"    ℓ = -⟨S k, v⟩                         e = -v;
        "l2"     ℓ = ½‖r‖²                             e = r;
        "lp"     ℓ = (1/p) Σ_i |r_i|^p  (p ≥ 1)        e = sign(r) ⊙ |r|^{p-1};
        "huber"  ℓ = Σ_i h_δ(r_i), h_δ(x) = ½x² for |x| ≤ δ, δ(|x| - ½δ) beyond,   e = clamp(r, -δ, δ);
        the token gradient is g = e kᵀ (so "lp" with p = 2 and "huber" with δ → ∞ are "l2").
    decay: "after" (linearise at S_{b-1}) or "before" (linearise at α_b⋯α_t · S_{b-1}).
    chunk: chunk size C ≥ 1; gradients inside a chunk are taken at the chunk-start state.
    read: "online" (o_t = S_t q_t), "before" (S_{t-1} q_t) or "boundary" (S_{b-1} q_t).
    grad: outer-gradient mode, "through", "stop" or "truncate" (every ``truncate_k`` chunks).
    optimizer: inner optimizer (DESIGN §5), applied per token on the g_t of the chunk's linearisation point:
        "gd"           S ← α ⊙ S − η g;
        "momentum_gd"  m ← β ⊙ m − η g,  S ← α ⊙ S + m   (β: the ``momentum`` rate input);
        "dgd"          S ← S (α I − η k kᵀ) − η g          (keys l2-normalised by the caller);
        "newton_schulz"   m ← β ⊙ m + g,  S ← α ⊙ S − η NS_steps(m)   (β = 0 when no momentum rate is given;
                       NS per head on the dv×dk matrix, ``runtime/ops/newton_schulz.py``);
        "delta_momentum"  m ← m (α I − λ ĝᵀĝ) − η g,  S ← S + m,  ĝ = g / (‖g‖_F + ε), ε = ``eps``
                       (ĝᵀĝ is dk×dk; α acts on the momentum, not on S).
    p: the exponent of "lp"; delta: the threshold δ of "huber"; steps: the Newton–Schulz iterations;
    lam: delta_momentum's λ; eps: delta_momentum's ε (default 1e-8).
    residual, norm: an output map, M(x) = [x +] [LN](S x) (a depth-1 MLP memory, ``memory_maps``): the
    gradient becomes δ kᵀ with δ = ∂ℓ/∂(S k) through the map; reads return M(q).
    window: the objective sums ℓ over the last ``window`` keys and values (``memory_maps``); with
    window > 1, k and v come as (..., window, d) stacks.  Not with "dgd" (its factor takes one key).
    A per-channel α (shape (..., dk)) acts on the key axis: S ← S·diag(α) (likewise β on m).
    ``decay="before"`` with ``dgd`` is an error: the DGD factor already carries α; likewise with
    ``delta_momentum``, whose α acts on the momentum (the state itself is not decayed).
    """

    objective: str
    decay: str
    chunk: int
    read: str
    grad: str = "through"
    truncate_k: int = 1
    optimizer: str = "gd"
    p: float = 2.0
    delta: float = 1.0
    steps: int = 5
    lam: float = 1.0
    eps: float = DELTA_MOMENTUM_EPS
    residual: bool = False
    norm: bool = False
    ln_eps: float = 1e-5
    window: int = 1

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, OBJECTIVES)
        if isinstance(self.window, bool) or int(self.window) != self.window or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if self.window > 1 and self.optimizer == "dgd":
            raise ValueError('a windowed objective with optimizer "dgd" is not defined (its factor takes one key)')
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "dgd" and self.decay == "before":
            raise ValueError('decay "before" with optimizer "dgd" is an error: the DGD factor already carries α')
        if self.optimizer == "delta_momentum" and self.decay == "before":
            raise ValueError('decay "before" with optimizer "delta_momentum" is an error: its α acts on the momentum')
        check_catalogue_numbers(self.p, self.delta, self.steps, self.lam, self.eps)
        _check_choice("decay", self.decay, DECAYS)
        _check_choice("read", self.read, READS)
        _check_choice("grad", self.grad, GRADS)
        if int(self.chunk) != self.chunk or self.chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {self.chunk!r}")
        if int(self.truncate_k) != self.truncate_k or self.truncate_k < 1:
            raise ValueError(f"truncate_k must be an int >= 1, got {self.truncate_k!r}")


def check_catalogue_numbers(p: float, delta: float, steps: int, lam: float, eps: float) -> None:
    """The objective and optimizer parameters: p ≥ 1, δ > 0, steps an int ≥ 0, λ finite, ε ≥ 0."""
    if not isinstance(p, (int, float)) or not 1 <= p < float("inf"):
        raise ValueError(f"p must be a number >= 1, got {p!r}")
    if not isinstance(delta, (int, float)) or not delta > 0:
        raise ValueError(f"delta must be a number > 0, got {delta!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(lam, (int, float)) or abs(lam) == float("inf") or lam != lam:
        raise ValueError(f"lam must be a finite number, got {lam!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def objective_residual(residual: Tensor, objective: str, p: float, delta: float) -> Tensor:
    """e = ∂ℓ/∂M(k) from the residual r = M(k) - v, for "l2", "lp" and "huber".

    "l2": r;  "lp": sign(r) ⊙ |r|^{p-1} (exactly r at p = 2);  "huber": clamp(r, -δ, δ).
    """
    if objective == "lp":
        if p == 2:
            return residual
        return residual.sign() * residual.abs().pow(p - 1)
    if objective == "huber":
        return residual.clamp(-delta, delta)
    return residual


def safe_frobenius(x: Tensor) -> Tensor:
    """‖x‖_F over the last two axes (kept), with a finite (zero) gradient where x = 0."""
    squares = x.pow(2).sum((-2, -1), keepdim=True)
    positive = squares > 0
    return torch.where(positive, torch.where(positive, squares, torch.ones_like(squares)).sqrt(), 0.0)


def normalised(g: Tensor, eps: float) -> Tensor:
    """ĝ = g / (‖g‖_F + ε), per matrix."""
    return g / (safe_frobenius(g) + eps)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class MatrixMemoryState:
    """State carried between calls.

    S: (B,H,dv,dk) state θ after the last consumed token.
    P: (B,H,dv,dk) state at the start of the current chunk, S_{b-1} (undecayed).
    log_decay: (B,H) Σ log α_s for s from the current chunk start b to the last consumed token
        ((B,H,dk) once a per-channel retention has been seen).
    phase: (B,) int64, tokens of the current chunk already consumed (0 ⇒ next token starts a chunk).
    chunks_done: (B,) int64, completed chunks since the document start.
    init: (H,dv,dk) or (B,H,dv,dk) document initial state θ_init (may require grad).
    momentum: (B,H,dv,dk) momentum buffer m of "momentum_gd" (zeros at the document start; left
        untouched by the other optimizers).  ``None`` at construction means zeros.
    """

    S: Tensor
    P: Tensor
    log_decay: Tensor
    phase: Tensor
    chunks_done: Tensor
    init: Tensor
    momentum: Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.momentum is None:
            self.momentum = torch.zeros_like(self.S)

    @classmethod
    def initial(cls, init: Tensor, batch: int) -> MatrixMemoryState:
        """Start-of-document state: S = P = θ_init, no decay, phase 0, no chunks done."""
        start = init_rows(init, batch)
        heads = start.shape[1]
        zeros_long = torch.zeros(batch, dtype=torch.int64, device=init.device)
        return cls(
            S=start,
            P=start,
            log_decay=torch.zeros(batch, heads, dtype=init.dtype, device=init.device),
            phase=zeros_long,
            chunks_done=zeros_long.clone(),
            init=init,
        )

    @property
    def batch(self) -> int:
        return self.S.shape[0]

    def detach(self) -> MatrixMemoryState:
        """The same state cut from the autograd graph (e.g. between training segments)."""
        return MatrixMemoryState(
            S=self.S.detach(),
            P=self.P.detach(),
            log_decay=self.log_decay.detach(),
            phase=self.phase,
            chunks_done=self.chunks_done,
            init=self.init.detach(),
            momentum=self.momentum.detach(),
        )

    def select(self, rows: Tensor | slice | int) -> MatrixMemoryState:
        """The state of a subset of batch rows (an int keeps the batch dimension)."""
        index = slice(rows, rows + 1) if isinstance(rows, int) else rows
        init = self.init[index] if self.init.dim() == 4 else self.init
        return MatrixMemoryState(
            S=self.S[index],
            P=self.P[index],
            log_decay=self.log_decay[index],
            phase=self.phase[index],
            chunks_done=self.chunks_done[index],
            init=init,
            momentum=self.momentum[index],
        )

    @classmethod
    def cat(cls, states: Sequence[MatrixMemoryState]) -> MatrixMemoryState:
        """Concatenate states along the batch dimension (a shared (H,dv,dk) init stays shared)."""
        first = states[0]
        if first.init.dim() == 4:
            init = torch.cat([s.init for s in states])
        else:
            init = first.init
        return cls(
            S=torch.cat([s.S for s in states]),
            P=torch.cat([s.P for s in states]),
            log_decay=torch.cat([s.log_decay for s in states]),
            phase=torch.cat([s.phase for s in states]),
            chunks_done=torch.cat([s.chunks_done for s in states]),
            init=init,
            momentum=torch.cat([s.momentum for s in states]),
        )


def init_rows(init: Tensor, batch: int) -> Tensor:
    """θ_init broadcast to (B,H,dv,dk)."""
    if init.dim() == 3:
        return init.unsqueeze(0).expand(batch, *init.shape)
    if init.dim() == 4 and init.shape[0] == batch:
        return init
    raise ValueError(f"init must be (H,dv,dk) or (B,H,dv,dk) with B={batch}, got {tuple(init.shape)}")


def safe_log_retain(retain: Tensor) -> Tensor:
    """log α, with α clamped away from 0 so that cumulative sums and their differences stay finite."""
    return torch.log(retain.clamp_min(_MIN_RETAIN))


def stop_gradient(theta: Tensor, init: Tensor) -> Tensor:
    """θ_init + sg(θ - θ_init): the value of θ, but gradients only reach θ_init."""
    start = init_rows(init, theta.shape[0])
    return start + (theta - start).detach()


def scale_keys(x: Tensor, rate: Tensor) -> Tensor:
    """x·diag(rate) on the key (last) axis: rate (B,H) scalar per head or (B,H,dk) per channel; x (B,H,dv,dk)."""
    if rate.dim() == x.dim() - 2:
        return rate[..., None, None] * x
    return x * rate[..., None, :]


class Chunking(Protocol):
    """What truncation needs of a memory's configuration (shared by the matrix and MLP memories)."""

    @property
    def chunk(self) -> int: ...

    @property
    def truncate_k(self) -> int: ...


def truncation_mask(phase: Tensor, chunks_done: Tensor, cfg: Chunking, steps: int) -> Tensor:
    """(B,steps) bool: the state is detached just before token j of this call.

    Token j (counted from the call start) starts a chunk when (phase + j) mod C = 0; the number of
    chunks completed before it is chunks_done + (phase + j) div C.  Truncation happens at chunk
    starts after a positive multiple of ``truncate_k`` completed chunks.
    """
    pos = torch.arange(steps, device=phase.device)
    offset = phase[:, None] + pos
    count = chunks_done[:, None] + offset // cfg.chunk
    starts = offset % cfg.chunk == 0
    return starts & (count > 0) & (count % cfg.truncate_k == 0)

"""Configuration, carried state and shared maths of an MLP-memory level.

Per batch row and head the memory is M(x) = x + W1 σ(W2 x) (or x + LN(W1 σ(W2 x)) with ``norm``),
W2 ∈ R^{h×d} (input side), W1 ∈ R^{d×h} (output side), σ = SiLU.  Its parameters θ = (W1, W2) are
trained in context by an inner optimizer on ℓ(θ; k, v); the initial state θ_{-1} is always given
by the caller (a meta-learned parameter: gradients reach it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..matrix_memory.state import (  # shared with the matrix memory
    DELTA_MOMENTUM_EPS,
    check_catalogue_numbers,
    init_rows,
    objective_residual,
)
from ..memory_maps import layer_norm, layer_norm_backward  # shared with the matrix memory's output map

OBJECTIVES = ("dot", "l2", "lp", "huber")
READS = ("online", "before", "boundary")
GRADS = ("through", "stop", "truncate")
OPTIMIZERS = ("gd", "momentum_gd", "dgd", "newton_schulz", "delta_momentum")
ACTIVATIONS = ("silu", "gelu", "relu")

_MIN_RATE = 1e-30


@dataclass(frozen=True)
class MLPMemoryConfig:
    """Static configuration of one MLP-memory level.

    objective: with r = M(k) - v and e = ∂ℓ/∂M(k):
        "l2"     ℓ = ½‖r‖²                                   e = r;
        "dot"    ℓ = -⟨M(k), v⟩                              e = -v;
        "lp"     ℓ = (1/p) Σ_i |r_i|^p  (p ≥ 1)              e = sign(r) ⊙ |r|^{p-1};
        "huber"  ℓ = Σ_i ½r_i² (|r_i| ≤ δ), δ(|r_i| - ½δ) beyond   e = clamp(r, -δ, δ);
        the gradients are e back-propagated through the MLP (``token_gradients``).
    chunk: chunk size C ≥ 1; every g_t of a chunk is taken at the chunk-start state θ_{b-1}.
    read: "online" (θ_t), "before" (θ_{t-1}) or "boundary" (θ_{b-1}); o_t = M_θ(q_t).
    grad: outer-gradient mode "through", "stop" or "truncate" (every ``truncate_k`` chunks).
    optimizer: "gd" (θ ← α θ - η g), "momentum_gd" (m ← β m - η g, θ ← α θ + m, per parameter) or
        "dgd" (W2 ← W2 (α I - η k̂ k̂ᵀ) - η g2 with k̂ = k / ‖k‖; W1 ← α W1 - η g1; with ``dgd_both`` also
        W1 ← α W1 - η (W1 ŝ) ŝᵀ - η g1, ŝ = s / ‖s‖ the normalised hidden input s = σ(W2 k) of W1 at the
        chunk's linearisation point),
        "newton_schulz" (per weight matrix W ∈ {W1, W2} with its gradient g and momentum m:
        m ← β m + g, W ← α W - η NS_steps(m); β = 0 without a momentum rate) or
        "delta_momentum" (per weight matrix: m ← α m - λ m ĝᵀĝ - η g, W ← W + m, ĝ = g / (‖g‖_F + ε)).
    p, delta: the "lp" exponent and the "huber" threshold; steps: Newton–Schulz iterations;
    lam, eps: delta_momentum's λ and ε.
    norm: M(x) = x + LN(W1 σ(W2 x)) with a parameter-free LayerNorm over d (eps ``ln_eps``).
    window: the objective sums ℓ over the last ``window`` keys and values (``runtime/ops/memory_maps.py``);
        with window > 1, k and v come as (B,H,T,window,d) stacks.  Not with "dgd".
    A per-channel α (B,H,T,d) acts on the model channels: W2 ← W2·diag(α), W1 ← diag(α)·W1.
    """

    objective: str = "l2"
    chunk: int = 1
    read: str = "online"
    grad: str = "through"
    truncate_k: int = 1
    optimizer: str = "gd"
    norm: bool = False
    activation: str = "silu"
    ln_eps: float = 1e-5
    p: float = 2.0
    delta: float = 1.0
    steps: int = 5
    lam: float = 1.0
    eps: float = DELTA_MOMENTUM_EPS
    window: int = 1
    dgd_both: bool = False

    def __post_init__(self) -> None:
        check_catalogue_numbers(self.p, self.delta, self.steps, self.lam, self.eps)
        if isinstance(self.window, bool) or int(self.window) != self.window or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if self.window > 1 and self.optimizer == "dgd":
            raise ValueError('a windowed objective with optimizer "dgd" is not defined (its factor takes one key)')
        if self.dgd_both and self.optimizer != "dgd":
            raise ValueError(f'dgd_both applies to optimizer "dgd", not {self.optimizer!r}')
        for name, choices in (
            ("objective", OBJECTIVES),
            ("read", READS),
            ("grad", GRADS),
            ("optimizer", OPTIMIZERS),
            ("activation", ACTIVATIONS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if int(self.chunk) != self.chunk or self.chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {self.chunk!r}")
        if int(self.truncate_k) != self.truncate_k or self.truncate_k < 1:
            raise ValueError(f"truncate_k must be an int >= 1, got {self.truncate_k!r}")


@dataclass
class MLPMemoryState:
    """State carried between calls (exact streaming).

    W1: (B,H,d,h), W2: (B,H,h,d) the state θ after the last consumed token.
    P1, P2: the chunk-start state θ_{b-1} (the linearisation point of the current chunk).
    phase: (B,) int64 tokens of the current chunk already consumed; chunks_done: (B,) int64.
    init1: (H,d,h) or (B,H,d,h), init2: (H,h,d) or (B,H,h,d), the document initial state θ_{-1}.
    M1, M2: momentum buffers of "momentum_gd" (``None`` at construction means zeros).
    """

    W1: Tensor
    W2: Tensor
    P1: Tensor
    P2: Tensor
    phase: Tensor
    chunks_done: Tensor
    init1: Tensor
    init2: Tensor
    M1: Tensor = None  # type: ignore[assignment]
    M2: Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.M1 is None:
            self.M1 = torch.zeros_like(self.W1)
        if self.M2 is None:
            self.M2 = torch.zeros_like(self.W2)

    @classmethod
    def initial(cls, init1: Tensor, init2: Tensor, batch: int) -> MLPMemoryState:
        """Start-of-document state: θ = θ_{b-1} = θ_init, zero momentum, phase 0."""
        W1, W2 = init_rows(init1, batch), init_rows(init2, batch)
        zeros_long = torch.zeros(batch, dtype=torch.int64, device=init1.device)
        return cls(W1, W2, W1, W2, zeros_long, zeros_long.clone(), init1, init2)

    @property
    def batch(self) -> int:
        return self.W1.shape[0]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(W1, W2, P1, P2, M1, M2)."""
        return self.W1, self.W2, self.P1, self.P2, self.M1, self.M2

    def replace(self, **fields: Tensor) -> MLPMemoryState:
        values = {
            name: getattr(self, name)
            for name in ("W1", "W2", "P1", "P2", "phase", "chunks_done", "init1", "init2", "M1", "M2")
        }
        values.update(fields)
        return MLPMemoryState(**values)

    def detach(self) -> MLPMemoryState:
        """The same state cut from the autograd graph."""
        return self.replace(
            **{n: getattr(self, n).detach() for n in ("W1", "W2", "P1", "P2", "M1", "M2", "init1", "init2")}
        )

    def select(self, rows: Tensor | slice | int) -> MLPMemoryState:
        """The state of a subset of batch rows (an int keeps the batch dimension)."""
        index = slice(rows, rows + 1) if isinstance(rows, int) else rows
        fields = {n: getattr(self, n)[index] for n in ("W1", "W2", "P1", "P2", "M1", "M2", "phase", "chunks_done")}
        for n in ("init1", "init2"):
            x = getattr(self, n)
            fields[n] = x[index] if x.dim() == 4 else x
        return self.replace(**fields)

    @classmethod
    def cat(cls, states: Sequence[MLPMemoryState]) -> MLPMemoryState:
        """Concatenate along the batch dimension (a shared (H,·,·) init stays shared)."""
        first = states[0]
        fields = {
            n: torch.cat([getattr(s, n) for s in states])
            for n in ("W1", "W2", "P1", "P2", "M1", "M2", "phase", "chunks_done")
        }
        for n in ("init1", "init2"):
            x = getattr(first, n)
            fields[n] = torch.cat([getattr(s, n) for s in states]) if x.dim() == 4 else x
        return first.replace(**fields)


def safe_log(rate: Tensor) -> Tensor:
    """log of a rate in (0, 1], clamped away from 0 so that differences of cumulative sums stay finite."""
    return torch.log(rate.clamp_min(_MIN_RATE))


# ---------------------------------------------------------------- the memory and its gradients


def activation(a: Tensor, kind: str = "silu") -> Tensor:
    """σ: SiLU, GELU (the exact, erf form) or ReLU."""
    if kind == "gelu":
        return torch.nn.functional.gelu(a)
    if kind == "relu":
        return torch.relu(a)
    return a * torch.sigmoid(a)


def activation_grad(a: Tensor, kind: str = "silu") -> Tensor:
    """σ'(a), written out because the chunked forms differentiate by hand: SiLU s(a) (1 + a (1 − s(a))) with s
    the logistic function; GELU Φ(a) + a φ(a) with Φ, φ the standard normal cdf and density; ReLU 1[a > 0]."""
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(a * (1 / math.sqrt(2))))
        return cdf + a * torch.exp(-0.5 * a * a) * (1 / math.sqrt(2 * math.pi))
    if kind == "relu":
        return (a > 0).to(a.dtype)
    sig = torch.sigmoid(a)
    return sig * (1 + a * (1 - sig))


def apply_memory(W1: Tensor, W2: Tensor, x: Tensor, cfg: MLPMemoryConfig) -> Tensor:
    """M_θ(x) for x (B,H,L,d) and θ = (W1 (B,H,d,h), W2 (B,H,h,d)) -> (B,H,L,d)."""
    hidden = activation(x @ W2.transpose(-1, -2), cfg.activation)
    z = hidden @ W1.transpose(-1, -2)
    return x + (layer_norm(z, cfg.ln_eps)[0] if cfg.norm else z)


def apply_memory_backward(
    W1: Tensor, W2: Tensor, x: Tensor, d_out: Tensor, cfg: MLPMemoryConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`apply_memory`'s backward written out, for d_out = ∂L/∂M_θ(x) (B,H,L,d).

    Returns (∂L/∂x, δ, s, u): with a = x W2ᵀ, s = σ(a), z = s W1ᵀ, δ = ∂L/∂z and u = ∂L/∂a, the weight
    gradients are ∂L/∂W1 = δᵀ s and ∂L/∂W2 = uᵀ x, summed over whichever tokens (and rows) the caller
    wants in one product."""
    a = x @ W2.transpose(-1, -2)
    s = activation(a, cfg.activation)
    norm = layer_norm(s @ W1.transpose(-1, -2), cfg.ln_eps) if cfg.norm else None
    delta, u = _pull_back(d_out, a, norm, W1, cfg)
    return d_out + u @ W2, delta, s, u


def _pull_back(
    e: Tensor, a: Tensor, norm: tuple[Tensor, Tensor] | None, W1: Tensor, cfg: MLPMemoryConfig
) -> tuple[Tensor, Tensor]:
    """(δ, u) for e = ∂L/∂M(x): δ = e, or LN's backward of e given LN's (n, r); u = (W1ᵀ δ) ⊙ σ'(a)."""
    delta = layer_norm_backward(e, *norm) if norm is not None else e
    return delta, (delta @ W1) * activation_grad(a, cfg.activation)


def output_map(z: Tensor, cfg: MLPMemoryConfig) -> Tensor:
    """The branch output from z = W1 σ(W2 x): z, or LN(z) with ``norm``."""
    return layer_norm(z, cfg.ln_eps)[0] if cfg.norm else z


def token_gradients(
    P1: Tensor, P2: Tensor, k: Tensor, v: Tensor, cfg: MLPMemoryConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-one factors of the per-token gradients at θ = (P1, P2), for k, v (B,H,L,d).

    Returns (δ, s, u), (B,H,L,d), (B,H,L,h), (B,H,L,h) with g1 = δ sᵀ (∂ℓ/∂W1) and g2 = u kᵀ (∂ℓ/∂W2):
    a = W2 k, s = σ(a), z = W1 s, e = ∂ℓ/∂M: -v ("dot"), else ``objective_residual`` of r = M(k) - v
    (r for "l2"), δ = e (or LN's backward of e), u = (W1ᵀ δ) ⊙ σ'(a).
    """
    a = k @ P2.transpose(-1, -2)
    s = activation(a, cfg.activation)
    z = s @ P1.transpose(-1, -2)
    norm = layer_norm(z, cfg.ln_eps) if cfg.norm else None
    y = norm[0] if norm is not None else z
    e = -v if cfg.objective == "dot" else objective_residual(k + y - v, cfg.objective, cfg.p, cfg.delta)
    delta, u = _pull_back(e, a, norm, P1, cfg)
    return delta, s, u

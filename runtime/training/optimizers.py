"""Outer optimizer levels (DESIGN §5, "outer optimizers"): sgd, momentum, adamw, muon, m3 and dmgd.

Each is a `LevelOptimizer`: per-parameter state of tensors and numbers only, a cadence (`every N steps`), and
the hyper-parameters under the catalogue's names (`beta1`, `beta2`, ...). `OUTER_OPTIMIZERS` is the closed
registry the training loop builds them from.

Momentum is a level in its own right (NL §4: an associative memory of gradients): `sgd` takes an optional
gradient memory m, a key-less memory whose values are the parameter's gradients g, trained by one step of
gradient descent on its own objective ℓ and read by the update Θ ← Θ − η m:
    dot: ℓ(m) = −⟨m, g⟩,        m ← α m + η_m g          (heavy-ball momentum; α = β, η_m = 1 is torch's SGD)
    l2:  ℓ(m) = ½‖m − g‖²,      m ← α m − η_m (m − g)    (an EMA of gradients when α = 1)
The named `momentum(beta)` and `sgd(momentum = beta)` are that memory with `dot`, η_m = 1 and α = β.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import RuntimeInputError
from ..ops.newton_schulz import newton_schulz
from .optimizers_base import LevelOptimizer, require_matrices, zeros_state
from .optimizers_dmgd import DMGD
from .optimizers_m3 import M3

MEMORY_OBJECTIVES = ("dot", "l2")
MOMENTUM_BUFFER = "momentum_buffer"  # torch's own key, so sgd checkpoints read the same


class AdamW(LevelOptimizer):
    """torch.optim.AdamW's single-tensor algorithm (decoupled weight decay, bias-corrected moments)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        weight_decay: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        betas: tuple[float, float] | list[float] | None = None,
        every: int = 1,
    ) -> None:
        if betas is not None:
            beta1, beta2 = (float(b) for b in betas)
        defaults = {"lr": lr, "weight_decay": weight_decay, "beta1": beta1, "beta2": beta2, "eps": eps}
        super().__init__(params, defaults, every)

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, beta1, beta2, eps = group["lr"], group["beta1"], group["beta2"], group["eps"]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        exp_avg, exp_avg_sq = zeros_state(state, "exp_avg", param), zeros_state(state, "exp_avg_sq", param)
        state["step"] += 1
        if group["weight_decay"] != 0:
            param.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(state["step"].item())
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


class SGD(LevelOptimizer):
    """Θ ← Θ − η d, with d the gradient (plus weight_decay·Θ, as torch's SGD) or, with a gradient memory,
    the memory's state after it took in the gradient (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        memory: dict[str, Any] | None = None,
        every: int = 1,
    ) -> None:
        if memory is None and momentum:
            memory = {"objective": "dot", "lr": 1.0, "retain": momentum}
        if memory is not None:
            memory = _memory_settings(memory)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "memory": memory}, every)

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])
        memory = group["memory"]
        if memory is not None:
            grad = gradient_memory_step(zeros_state(state, MOMENTUM_BUFFER, param), grad, **memory)
        param.add_(grad, alpha=-group["lr"])


class Momentum(SGD):
    """`momentum(lr, beta)`: heavy-ball momentum, m ← β m + g, Θ ← Θ − η m (torch's SGD with momentum β)."""

    def __init__(
        self, params: Iterable[Any], lr: float, beta: float = 0.9, weight_decay: float = 0.0, every: int = 1
    ) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, memory=_dot_memory(beta), every=every)


def _dot_memory(retain: float) -> dict[str, Any]:
    return {"objective": "dot", "lr": 1.0, "retain": retain}


def _memory_settings(memory: dict[str, Any]) -> dict[str, Any]:
    objective = memory.get("objective", "dot")
    if objective not in MEMORY_OBJECTIVES:
        raise RuntimeInputError(
            f"a gradient memory's objective is one of {', '.join(MEMORY_OBJECTIVES)}, not {objective!r}"
        )
    return {"objective": objective, "lr": float(memory.get("lr", 1.0)), "retain": float(memory.get("retain", 1.0))}


def gradient_memory_step(buffer: Tensor, grad: Tensor, objective: str, lr: float, retain: float) -> Tensor:
    """One gd step of the key-less gradient memory m on its objective, in place; returns m."""
    if objective == "dot":  # ∇ℓ = −g
        return buffer.mul_(retain).add_(grad, alpha=lr)
    step = buffer - grad  # ∇ℓ = m − g, at the state before retention acts (decay after)
    return buffer.mul_(retain).sub_(step, alpha=lr)


class Muon(LevelOptimizer):
    """m ← β m + g; Θ ← Θ(1 − η λ) − η NS_steps(m), NS exactly as DESIGN §5 (per matrix of the last two
    axes, so per head for (heads, rows, cols) states); η stays outside. Matrices only."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.95,
        steps: int = 5,
        weight_decay: float = 0.0,
        every: int = 1,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "steps": int(steps), "weight_decay": weight_decay}
        super().__init__(params, defaults, every)
        require_matrices(self, "muon")

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        buffer = zeros_state(state, MOMENTUM_BUFFER, param)
        buffer.mul_(group["momentum"]).add_(grad)
        if group["weight_decay"] != 0:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(newton_schulz(buffer, group["steps"]), alpha=-group["lr"])


OUTER_OPTIMIZERS: dict[str, type[LevelOptimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "adamw": AdamW,
    "muon": Muon,
    "m3": M3,
    "dmgd": DMGD,
}
MATRIX_ONLY = ("muon", "m3")

__all__ = ["OUTER_OPTIMIZERS", "MATRIX_ONLY", "AdamW", "SGD", "Momentum", "Muon", "M3", "DMGD", "LevelOptimizer"]

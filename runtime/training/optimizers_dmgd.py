"""DMGD, deep momentum gradient descent (NL Eq. 50): the momentum is an MLP memory trained by its own loss.

Eq. 50 reads W ← W + m_{i+1}(u_i), m_{i+1} = α m_i − η ∇L⁽²⁾(m_i; u_i, I) with u_i = ∇L(W_i; x_i). The paper
does not fix the memory's inputs; this runtime's reading, per parameter Θ viewed as rows (R × C, the last axis
is C; a vector is one row) with gradient rows u_r:
    keys k_r = u_r / (‖u_r‖ + 1e−8), values v_r = u_r                   (the gradients are the memory's data)
    memory m_φ(k) = W1 h(k), h(k) = tanh(W2 k) / √H                       (W2 ∈ R^{H×C}, W1 ∈ R^{C×H}, H = expand·C)
    inner loss (the `dot` objective of momentum) L⁽²⁾(φ) = −(1/R) Σ_r ⟨m_φ(k_r), v_r⟩
    one gd step on it: W1 ← β W1 − η_in ∇_{W1} L⁽²⁾, W2 ← W2 − η_in ∇_{W2} L⁽²⁾   (retention β on the value side)
    update Θ_r ← Θ_r − η m_φ'(k_r)                                        (the updated memory, m_{i+1}(u_i))
With a constant feature map h this is heavy-ball momentum of the mean gradient row (η_in = 1 − β: an EMA);
with the learned map, a row's step recalls past gradients by the similarity of their directions.
W1 starts at zero and W2 at N(0, 1), drawn from a generator seeded by the parameter's index (reproducible,
and independent of the global RNG).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .optimizers_base import LevelOptimizer

W1, W2, INDEX = "w1", "w2", "index"
KEY_EPS = 1e-8


class DMGD(LevelOptimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        beta: float = 0.9,
        expand: float = 1.0,
        inner_lr: float = 0.1,
        every: int = 1,
    ) -> None:
        super().__init__(params, {"lr": lr, "beta": beta, "expand": expand, "inner_lr": inner_lr}, every)
        for index, param in enumerate(p for g in self.param_groups for p in g["params"]):
            self.state[param][INDEX] = index

    def hidden(self, param: Tensor) -> int:
        expand = next(g["expand"] for g in self.param_groups if any(p is param for p in g["params"]))
        return max(1, round(expand * _width(param)))

    def state_shape(self, param: Tensor, key: str) -> tuple[int, ...] | None:
        if key == W1:
            return (_width(param), self.hidden(param))
        if key == W2:
            return (self.hidden(param), _width(param))
        return None

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if W1 not in state:
            self._init_memory(param, state)
        values = grad.reshape(-1, _width(param))
        keys = values / (values.norm(dim=-1, keepdim=True) + KEY_EPS)
        grad_w1, grad_w2 = inner_gradients(state[W1], state[W2], keys, values)
        state[W1].mul_(group["beta"]).sub_(grad_w1, alpha=group["inner_lr"])
        state[W2].sub_(grad_w2, alpha=group["inner_lr"])
        param.sub_(memory_read(state[W1], state[W2], keys).reshape(param.shape), alpha=group["lr"])

    def _init_memory(self, param: Tensor, state: dict[str, Any]) -> None:
        generator = torch.Generator().manual_seed(int(state.get(INDEX, 0)))
        hidden, width = self.hidden(param), _width(param)
        w2 = torch.randn(hidden, width, generator=generator, dtype=torch.float64)
        state[W2] = w2.to(device=param.device, dtype=param.dtype)
        state[W1] = torch.zeros(width, hidden, device=param.device, dtype=param.dtype)


def _width(param: Tensor) -> int:
    return int(param.shape[-1]) if param.dim() else 1


def features(w2: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """(h, tanh(W2 k)) for every key row: h = tanh(W2 k) / √H."""
    pre = torch.tanh(keys @ w2.T)
    return pre / math.sqrt(w2.shape[0]), pre


def memory_read(w1: Tensor, w2: Tensor, keys: Tensor) -> Tensor:
    """m_φ(k_r) = W1 h(k_r) for every row."""
    return features(w2, keys)[0] @ w1.T


def inner_loss(w1: Tensor, w2: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """L⁽²⁾(φ) = −(1/R) Σ_r ⟨m_φ(k_r), v_r⟩."""
    return -(memory_read(w1, w2, keys) * values).sum() / keys.shape[0]


def inner_gradients(w1: Tensor, w2: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(∇_{W1} L⁽²⁾, ∇_{W2} L⁽²⁾), written out: −(1/R) Vᵀ h and −(1/R) ((V W1) ⊙ (1 − tanh²) / √H)ᵀ K."""
    rows = keys.shape[0]
    h, pre = features(w2, keys)
    grad_w1 = -(values.T @ h) / rows
    back = (values @ w1) * (1 - pre * pre) / math.sqrt(w2.shape[0])
    grad_w2 = -(back.T @ keys) / rows
    return grad_w1, grad_w2

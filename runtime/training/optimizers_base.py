"""The base of every outer optimizer level: a torch optimizer with a cadence (`update every N steps`).

An outer level that updates every N steps accumulates (sums) its share of the outer gradient over N calls of
`step()` (each step's gradient as the loop left it, after clipping) and updates on the N-th, as a task level
sums its chunk's gradients (DESIGN §3, CMS Eq. 71). All state is per parameter and made of tensors and plain
numbers, so a checkpoint (safetensors + JSON) holds it whole and a resumed run continues bit for bit.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import RuntimeInputError

ACCUMULATED = "accumulated"  # the gradient summed since the last update (only when every > 1)
CALLS = "calls"  # calls of step() seen by this parameter (only when every > 1)


class LevelOptimizer(torch.optim.Optimizer, metaclass=ABCMeta):
    """Subclasses implement `update(param, grad, state, group)` for one parameter and its own state."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], every: int = 1) -> None:
        every = int(every)
        if every < 1:
            raise RuntimeInputError(f"an optimizer level updates every N >= 1 steps, got {every}")
        super().__init__(params, {**defaults, "every": every})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                grad = _cadenced_grad(param, state, int(group["every"]))
                if grad is not None:
                    self.update(param, grad, state, group)
        return loss

    @abstractmethod
    def update(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Step `param` in place from its gradient `grad` and its own `state`."""

    def state_shape(self, param: Tensor, key: str) -> tuple[int, ...] | None:
        """The shape a state tensor `key` of `param` must have (None: the parameter's own shape)."""
        return None


def _cadenced_grad(param: Tensor, state: dict[str, Any], every: int) -> Tensor | None:
    """The gradient to update with now: this step's (every = 1), or the N-step sum on every N-th call."""
    if every == 1:
        return param.grad
    if ACCUMULATED not in state:
        state[ACCUMULATED] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state[CALLS] = 0
    if param.grad is not None:
        state[ACCUMULATED].add_(param.grad)
    state[CALLS] = int(state[CALLS]) + 1
    if state[CALLS] % every:
        return None
    grad = state[ACCUMULATED].clone()
    state[ACCUMULATED].zero_()
    return grad


def zeros_state(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    """state[key], created as zeros shaped like `like` the first time."""
    if key not in state:
        state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    return state[key]


def require_matrices(optimizer: torch.optim.Optimizer, kind: str) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.dim() < 2:
                raise RuntimeInputError(
                    f"`{kind}` orthogonalises matrices, but it was given a parameter of shape {tuple(param.shape)}",
                    hint="give its level `params matrices` (and `states`), and train gains and biases with adamw",
                )

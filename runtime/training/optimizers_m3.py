"""M3, the multi-scale momentum optimizer of NL Algorithm 1, as DESIGN §5 reconstructs it.

Per parameter Θ (a matrix, or a stack of them), at its s-th update with gradient g:
    fast momentum  M1 ← β1 M1 + (1 − β1) g           (`momentum_sum = 1`: M1 ← M1 + β1 g, as printed)
    second moment  V  ← β2 V + (1 − β2) g², V̂ = V / (1 − β2^s)   (`v_sum = 1`: V ← V + β2 g², V̂ = V, AdaGrad-like,
                                                       as printed)
    O1 = NS_steps(M1)
    Θ ← Θ − η (O1 + α O2) / (√V̂ + ε)
    every Ĉ = `slow_every` updates, with S the sum of the Ĉ gradients since the last time:
    slow momentum  M2 ← β3 M2 + (1 − β3) S           (`momentum_sum = 1`: M2 ← M2 + β3 S, as printed)
                   O2 = NS_steps(M2)                  (O2 = 0 until the first slow update)
Public copies of Algorithm 1 are garbled: whether V is Adam's EMA or a running sum and whether the momenta are
EMAs or sums are the two stated choices above (defaults: EMAs, V bias-corrected as Adam's is).
ε defaults to 1e-3, not Adam's 1e-8: NS output has entries of order 1/√n whatever the gradient's scale, so where
√V̂ is tiny (a nearly unused weight) the step would be huge; ε bounds it by η·|O|/ε (1e-8 gave NaN in HOPE).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..ops.newton_schulz import newton_schulz
from .optimizers_base import LevelOptimizer, require_matrices, zeros_state


class M3(LevelOptimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        beta3: float = 0.9,
        alpha: float = 1.0,
        slow_every: int = 10,
        eps: float = 1e-3,
        steps: int = 5,
        momentum_sum: float = 0.0,
        v_sum: float = 0.0,
        every: int = 1,
    ) -> None:
        defaults = {
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "beta3": beta3,
            "alpha": alpha,
            "slow_every": max(1, int(slow_every)),
            "eps": eps,
            "steps": int(steps),
            "momentum_sum": bool(momentum_sum),
            "v_sum": bool(v_sum),
        }
        super().__init__(params, defaults, every)
        require_matrices(self, "m3")

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        fast, second = zeros_state(state, "fast", param), zeros_state(state, "second", param)
        slow, slow_grads, o2 = (zeros_state(state, key, param) for key in ("slow", "slow_grads", "o2"))
        state["step"] = int(state.get("step", 0)) + 1
        step, sums = state["step"], group["momentum_sum"]
        beta1, beta2, beta3 = group["beta1"], group["beta2"], group["beta3"]
        slow_grads.add_(grad)
        _momentum(fast, grad, beta1, sums)
        if group["v_sum"]:
            second.addcmul_(grad, grad, value=beta2)
            v_hat = second
        else:
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            v_hat = second / (1 - beta2**step)
        direction = newton_schulz(fast, group["steps"]).add_(o2, alpha=group["alpha"])
        param.addcdiv_(direction, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
        if step % group["slow_every"] == 0:
            _momentum(slow, slow_grads, beta3, sums)
            o2.copy_(newton_schulz(slow, group["steps"]))
            slow_grads.zero_()


def _momentum(buffer: Tensor, grad: Tensor, beta: float, as_sum: bool) -> None:
    if as_sum:
        buffer.add_(grad, alpha=beta)
    else:
        buffer.mul_(beta).add_(grad, alpha=1 - beta)

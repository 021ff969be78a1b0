"""The values a rate expression can take, by interval arithmetic over the IR (for the rate checks).

Sound, not tight: the true range lies inside the interval found, so a rate whose interval stays within its
bounds is safe; one whose interval leaves them may or may not (`sigmoid(x) * sigmoid(x)` is treated as two
independent factors). Learned projections, reads of other memories and convolutions are unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..ir import models as ir

Interval = tuple[float, float]
UNBOUNDED: Interval = (-math.inf, math.inf)
SILU_MIN, SILU_ARGMIN = -0.2784645, -1.2784645  # min over x of x·sigmoid(x), and where


def _sigmoid(x: float) -> float:
    if x < -700:  # exp(-x) would overflow; the value is 0 to float precision (and at -∞)
        return 0.0
    return 1.0 / (1.0 + math.exp(-x))


def _silu(x: float) -> float:
    if math.isinf(x):
        return max(x, 0.0)  # silu(+∞) = +∞, silu(−∞) = 0
    return x * _sigmoid(x)


def _softplus(x: float) -> float:
    return x if x > 30 else math.log1p(math.exp(x))


def _exp(x: float) -> float:
    return math.inf if x > 700 else math.exp(x)


# Monotone non-decreasing functions: the interval's ends map to the result's ends.
MONOTONE: dict[str, Callable[[float], float]] = {
    "sigmoid": _sigmoid,
    "tanh": math.tanh,
    "exp": _exp,
    "softplus": _softplus,
    "relu": lambda x: max(x, 0.0),
}


def value_range(expr: ir.Expr) -> Interval:
    """An interval that contains every value `expr` can take."""
    if isinstance(expr, ir.Const):
        return (expr.value, expr.value)
    if isinstance(expr, ir.Fn):
        inner = value_range(expr.arg)
        if expr.fn in MONOTONE:
            f = MONOTONE[expr.fn]
            return (f(inner[0]), f(inner[1]))
        if expr.fn == "silu":  # falls to its minimum, then rises: the maximum is at an end
            ends = (_silu(inner[0]), _silu(inner[1]))
            low = SILU_MIN if inner[0] <= SILU_ARGMIN <= inner[1] else min(ends)
            return (low, max(ends))
        if expr.fn == "mean":
            return inner
        if expr.fn == "l2norm":
            return (-1.0, 1.0)
        return UNBOUNDED  # conv (learned weights), rope (rotations mix channels)
    if isinstance(expr, ir.Bin):
        return _combine(expr.kind, value_range(expr.left), value_range(expr.right))
    return UNBOUNDED  # x, linear(...), reads of other levels, the level's own keys/values


def _combine(kind: str, a: Interval, b: Interval) -> Interval:
    if kind == "+":
        return (a[0] + b[0], a[1] + b[1])
    if kind == "-":
        return (a[0] - b[1], a[1] - b[0])
    if kind == "/":
        if b[0] <= 0.0 <= b[1]:
            return UNBOUNDED
        b = (1.0 / b[1], 1.0 / b[0])
    products = [_times(x, y) for x in a for y in b]
    return (min(products), max(products))


def _times(x: float, y: float) -> float:
    return 0.0 if x == 0.0 or y == 0.0 else x * y  # 0 · ∞ = 0: an end at zero stays there


def describe(interval: Interval) -> str:
    lo, hi = interval
    return f"[{lo:g}, {hi:g}]".replace("inf", "∞")

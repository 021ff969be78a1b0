"""Parameter counts of level instances at the system's sizes, computed from the IR alone (for `nestc show`
and for resource estimates), so they are known before any runtime builds the model."""

from __future__ import annotations

import math

from . import models as ir


def head_dim(system: ir.System, level: ir.Level) -> tuple[int, int]:
    """(heads, channels per head) of an in-context level."""
    heads = int(system.number("heads", 1)) if level.memory and level.memory.per_head else 1
    return heads, system.d // heads


def swiglu_hidden(d: int, expand: float = 8 / 3, multiple_of: int = 8) -> int:
    return multiple_of * math.ceil(math.ceil(expand * d) / multiple_of)


def layer_parameters(kind: str, d: int, vocab: int) -> int:
    return {
        "embed": vocab * d,
        "head": d * vocab,
        "linear": d * d,
        "rmsnorm": d,
        "layernorm": 2 * d,
        "swiglu": 3 * d * swiglu_hidden(d),
    }.get(kind, 0)


def _expr_parameters(expr: ir.Expr, d: int, width: int) -> int:
    if isinstance(expr, ir.Linear):
        return d * width + _expr_parameters(expr.arg, d, d)
    if isinstance(expr, ir.Fn):
        conv = (expr.size or 0) * width if expr.fn == "conv" else 0
        return conv + _expr_parameters(expr.arg, d, width)
    if isinstance(expr, ir.Bin):
        return _expr_parameters(expr.left, d, width) + _expr_parameters(expr.right, d, width)
    if isinstance(expr, ir.Read):
        return _expr_parameters(expr.arg, d, d)
    return 0


def level_parameters(system: ir.System, level: ir.Level) -> int:
    """Projections, rate maps and meta-learned initial state of one instance of a level."""
    if level.memory is None:
        return 0
    heads, dh = head_dim(system, level)
    d = system.d
    total = sum(_expr_parameters(expr, d, heads * dh) for expr in level.roles.values())
    shape_width = {"scalar": 1, "head": heads, "channel": heads * dh}
    total += sum(_expr_parameters(r.expr, d, shape_width[r.shape]) for r in level.rates().values())
    memory = level.memory
    if memory.kind == "mlp":
        hidden = int(memory.expand * dh)
        # The memory's norm is parameter-free (its gain would be an outer parameter inside the inner model).
        weights = dh * dh if memory.depth == 1 else 2 * dh * hidden * (memory.depth - 1)  # depth 1: W (d × d)
        total += heads * weights
    elif memory.kind == "persistent":
        total += heads * memory.tokens * 2 * dh
    return total

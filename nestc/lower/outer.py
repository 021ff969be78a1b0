"""Lowering of the outer optimizer levels (DESIGN §5, "outer optimizers"): their kinds, `params` selectors,
cadences and gradient-memory levels (momentum written as a level) become `OptimizerGroupPlan`s.

What the runtime cannot honour is an error here, with its span and a hint: `muon` and `m3` orthogonalise
matrices, so they may not train gains or biases; a gradient memory belongs to an `sgd` level, learns with
`gd` at constant rates, and steps when its owner does.
"""

from __future__ import annotations

from typing import Any

from nestc_runtime.plan import OptimizerGroupPlan

from ..checks.rules import default_owner
from ..diagnostics import DiagnosticBag
from ..ir import models as ir

MATRIX_OPTIMIZERS = ("muon", "m3")
MATRIX_SELECTORS = {"matrices", "embeddings", "states"}  # categories whose parameters are all matrices
CATEGORY_SELECTORS = {"all", "matrices", "embeddings", "gains", "biases", "states"}


def is_gradient_memory(level: ir.Level) -> bool:
    return level.memory is not None and level.memory.kind == "gradients"


def reject_outer(system: ir.System, bag: DiagnosticBag) -> None:
    """Errors for outer levels the runtime cannot run as written."""
    for level in system.levels:
        if level.outer is not None and level.outer.kind in MATRIX_OPTIMIZERS:
            _check_matrix_optimizer(level, bag)
        if is_gradient_memory(level):
            _check_gradient_memory(system, level, bag)


def _check_matrix_optimizer(level: ir.Level, bag: DiagnosticBag) -> None:
    assert level.outer is not None
    categories = [s for s in level.selectors if s in CATEGORY_SELECTORS]
    vectors = [s for s in categories if s not in MATRIX_SELECTORS]
    if vectors or (level.owner is None and not categories):
        claimed = ", ".join(f"`{s}`" for s in vectors) if vectors else "every parameter (it has no `params`)"
        bag.error(
            "E025",
            f"`{level.outer.kind}` orthogonalises matrices, but level `{level.name}` would train {claimed}",
            level.spans.get("params", level.spans.get("optimizer", level.span)),
            f"give `{level.name}` `params matrices` (and `states`), and train embeddings, gains and biases "
            "with a second `every step` level, e.g. `optimizer adamw(lr = 3e-3); params embeddings, gains, biases`",
        )


def _check_gradient_memory(system: ir.System, level: ir.Level, bag: DiagnosticBag) -> None:
    owner = system.level(level.owner) if level.owner else None
    where = level.spans.get("memory", level.span)
    if owner is None or owner.outer is None or owner.outer.kind != "sgd" or owner.outer.hyper.get("momentum"):
        bag.error(
            "E026",
            f"gradient memory `{level.name}` must be nested in an `sgd` level (without its own momentum)",
            level.spans.get("memory", level.span),
            "`level pretrain { update every step; optimizer sgd(lr = 0.05) }` and `level momentum in pretrain`",
        )
        return
    if level.update != owner.update:
        bag.error(
            "E016",
            f"gradient memory `{level.name}` updates {level.update.describe()}, its owner `{owner.name}` "
            f"{owner.update.describe()}",
            level.spans.get("update", where),
            f"a gradient memory steps when its owner does: `update {owner.update.describe()}`",
        )
    others = [lv.name for lv in system.levels if is_gradient_memory(lv) and lv.owner == owner.name]
    if others[0] != level.name:
        bag.error("E026", f"`{owner.name}` already has the gradient memory `{others[0]}`", where, "keep one")
    inner = level.inner
    if inner is not None and inner.kind != "gd":
        hint = "a gradient memory runs `gd(lr = 1, retain = beta)` (momentum); its own momentum is not supported"
        bag.error("E040", f"`{inner.kind}` on a gradient memory is not supported by the runtime yet", where, hint)
    for name, rate in level.rates().items():
        if constant_value(rate.expr) is None:
            bag.error(
                "E026",
                f"the `{name}` of gradient memory `{level.name}` must be a constant number",
                level.spans.get("optimizer", where),
                "a gradient memory has no input `x` to compute a rate from",
            )


def constant_value(expr: ir.Expr) -> float | None:
    """The value of a constant arithmetic expression, else None."""
    if isinstance(expr, ir.Const):
        return expr.value
    if not isinstance(expr, ir.Bin):
        return None
    left, right = constant_value(expr.left), constant_value(expr.right)
    if left is None or right is None or (expr.kind == "/" and right == 0):
        return None
    return {"+": left + right, "-": left - right, "*": left * right, "/": left / right if right else 0.0}[expr.kind]


def _memory_of(system: ir.System, owner: str) -> dict[str, Any] | None:
    for level in system.levels:
        if is_gradient_memory(level) and level.owner == owner and level.inner is not None:
            assert level.objective is not None
            lr, retain = constant_value(level.inner.lr.expr), constant_value(level.inner.retain.expr)
            return {"objective": level.objective.kind, "lr": lr, "retain": 1.0 if retain is None else retain}
    return None


def optimizer_groups(system: ir.System) -> list[OptimizerGroupPlan]:
    root = default_owner(system)
    groups = []
    for level in system.levels:
        if level.outer is None:
            continue
        owned = [lv.name for lv in system.levels if lv.in_context and not is_gradient_memory(lv)]
        groups.append(
            OptimizerGroupPlan(
                name=level.name,
                kind=level.outer.kind,
                hyper=dict(level.outer.hyper),
                every_steps=level.update.count if level.update.unit == "step" else 0,
                owns_levels=[name for name in owned if system.level(name).owner == level.name],
                default=root is not None and level.name == root.name,
                selectors=list(level.selectors),
                memory=_memory_of(system, level.name),
            )
        )
    return groups

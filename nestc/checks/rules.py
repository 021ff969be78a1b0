"""The rules of DESIGN §3 that `nestc check` enforces on the IR.

Rule 1: read sites and updates at one token form an acyclic graph (its order is the evaluation order).
Rule 2: a nested level is at least as fast as its owner, and its chunk divides the owner's.
Rule 3: every parameter belongs to exactly one level (one optimizer).
Plus shapes: `d` divisible by `heads`.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import DiagnosticBag, Label
from ..ir import models as ir
from ..ir.graph import evaluation_graph, site_label

REQUIRED_PARAMS = ("d", "vocab")


def check(system: ir.System) -> DiagnosticBag:
    """Run every rule; the returned bag holds all errors and warnings (it does not raise)."""
    bag = DiagnosticBag()
    _check_params(system, bag)
    _check_evaluation_order(system, bag)
    _check_nesting(system, bag)
    _check_ownership(system, bag)
    _warn_no_gradient(system, bag)
    return bag


def _check_params(system: ir.System, bag: DiagnosticBag) -> None:
    for name in REQUIRED_PARAMS:
        if name not in system.params:
            bag.error(
                "E013",
                f"system `{system.name}` needs a parameter `{name}`",
                system.span,
                f"add `{name} = ...` to the parameter list",
            )
    d, heads = system.params.get("d"), system.params.get("heads", 1)
    for name, value in (("d", d), ("heads", heads), ("vocab", system.params.get("vocab"))):
        if value is not None and (not float(value).is_integer() or value < 1):
            bag.error("E016", f"parameter `{name}` must be a positive integer, not {value}", system.span)
            return
    if d is not None and int(d) % int(heads) != 0:
        bag.error(
            "E025",
            f"`d = {d}` is not divisible by `heads = {heads}`",
            system.span,
            "each head gets d / heads channels; choose sizes that divide",
        )


def _check_evaluation_order(system: ir.System, bag: DiagnosticBag) -> None:
    graph = evaluation_graph(system)
    for level in system.levels:
        for expr in [*level.roles.values(), *_rate_exprs(level)]:
            for read in ir.expr_reads(expr):
                target = next((lv for lv in system.levels if lv.name == read.level), None)
                if target is None or not target.in_context:
                    bag.error(
                        "E027",
                        f"`{read.level}` has no memory to read",
                        read.span,
                        "only in-context levels (with `memory`) can be read",
                    )
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    sites = [site_label(u) for u, _ in cycle]
    first_level = cycle[0][0][1]
    level = system.level(first_level)
    labels = [
        Label(system.level(node[1]).span, f"{site_label(node)}") for node, _ in cycle[1:] if node[1] != first_level
    ]
    bag.error(
        "E020",
        "evaluation-order cycle: " + " -> ".join([*sites, sites[0]]),
        level.spans.get("keys", level.span),
        "generate keys, values and rates from a `boundary` or `before` read "
        "(e.g. `M(x, read = boundary)`), never from the level's own `online` state",
        labels=labels,
    )


def _rate_exprs(level: ir.Level) -> list[ir.Expr]:
    return [level.inner.lr.expr, level.inner.retain.expr] if level.inner else []


def _check_nesting(system: ir.System, bag: DiagnosticBag) -> None:
    by_name = {lv.name: lv for lv in system.levels}
    owners = nx.DiGraph((lv.name, lv.owner) for lv in system.levels if lv.owner in by_name)
    for cycle in nx.simple_cycles(owners):
        level = by_name[cycle[0]]
        bag.error(
            "E024",
            "levels own each other: " + " in ".join([*cycle, cycle[0]]),
            level.span,
            "ownership is a tree: the outermost level is owned by no one",
        )
    for inner in system.levels:
        outer = by_name.get(inner.owner or "")
        if outer is None:
            continue
        where = inner.spans.get("update", inner.span)
        fi, fo = inner.update, outer.update
        if fi.order_key() > fo.order_key():
            bag.error(
                "E021",
                f"level `{inner.name}` ({fi.describe()}) is nested in `{outer.name}` "
                f"({fo.describe()}) but updates less often",
                where,
                f"a nested level must be at least as fast as its owner: make `{inner.name}` update "
                f"{fo.describe()} or faster, or nest it elsewhere",
                labels=[Label(outer.spans.get("update", outer.span), f"`{outer.name}` updates here")],
            )
        elif fi.unit == fo.unit == "token" and fo.count % fi.count != 0:
            bag.error(
                "E022",
                f"level `{inner.name}` updates every {fi.count} tokens inside `{outer.name}`, "
                f"which updates every {fo.count} tokens: {fi.count} does not divide {fo.count}",
                where,
                f"choose a chunk that divides {fo.count} (e.g. {_divisor_near(fo.count, fi.count)})",
                labels=[Label(outer.spans.get("update", outer.span), f"`{outer.name}` updates here")],
            )


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def default_owner(system: ir.System) -> ir.Level | None:
    """The single outermost level with an outer optimizer: it trains the model's layers."""
    roots = [lv for lv in system.levels if lv.outer is not None and lv.owner is None]
    return roots[0] if len(roots) == 1 else None


def _check_ownership(system: ir.System, bag: DiagnosticBag) -> None:
    roots = [lv for lv in system.levels if lv.outer is not None and lv.owner is None]
    if not roots:
        bag.error(
            "E023",
            f"no level trains the parameters of `{system.name}`",
            system.span,
            "add e.g. `level pretrain { update every step; optimizer adamw(lr = 3e-3) }`",
        )
        return
    if len(roots) > 1:
        bag.error(
            "E023",
            "the model's layers would belong to several levels: " + ", ".join(f"`{r.name}`" for r in roots),
            roots[1].span,
            "keep one outermost `every step` level, or nest the others with `in`",
            labels=[Label(roots[0].span, f"`{roots[0].name}` also claims them")],
        )
    by_name = {lv.name: lv for lv in system.levels}
    for level in system.levels:
        if not level.in_context:
            continue
        owner = by_name.get(level.owner) if level.owner else roots[0]
        if owner is not None and owner.outer is None:
            bag.error(
                "E023",
                f"level `{level.name}` is nested in `{owner.name}`, which has no outer optimizer "
                "to train its projections and initial state",
                level.span,
                "nest in-context levels in an `every step` level with an optimizer such as adamw",
            )


def _warn_no_gradient(system: ir.System, bag: DiagnosticBag) -> None:
    for level in system.levels:
        if level.gradient.mode != "stop" or level.inner is None:
            continue
        fed = [role for role in ("keys", "values") if role in level.roles] + [
            name
            for name, rate in (("lr", level.inner.lr), ("retain", level.inner.retain))
            if not ir.is_constant(rate.expr)
        ]
        if fed:
            bag.warning(
                "W001",
                f"with `outer gradient stop`, the projections of `{level.name}`'s "
                f"{', '.join(fed)} get no gradient (they only feed updates)",
                level.spans.get("outer gradient", level.span),
                "use `outer gradient through` or `truncate k` to train them",
            )

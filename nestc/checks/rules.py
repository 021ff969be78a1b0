"""The rules of DESIGN §3 that `nestc check` enforces on the IR, and its warnings.

Rule 1: read sites and updates at one token form an acyclic graph (its order is the evaluation order).
Rule 2: a nested level is at least as fast as its owner, and its chunk divides the owner's.
Rule 3: every parameter belongs to exactly one level (one optimizer).
Rule 4: every value a level consumes at token t exists by then (model order vs `online` reads).
Rule 5: objectives and rates have the shapes their memory and optimizer expect (partly in elaboration),
and values in their ranges: η ≥ 0, α and β in [0, 1] (constants outside are errors, expressions that may
leave the range are warned about).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import networkx as nx

from ..diagnostics import DiagnosticBag, Label, Span
from ..ir import models as ir
from ..ir.catalogue import NEAREST_PARALLEL, PARALLEL_FORMS
from ..ir.graph import evaluation_graph, site_label
from .ranges import describe, value_range

REQUIRED_PARAMS = ("d", "vocab")


def check(system: ir.System, seq_len: int | None = None) -> DiagnosticBag:
    """Run every rule; the returned bag holds all errors and warnings (it does not raise)."""
    bag = DiagnosticBag()
    _check_params(system, bag)
    _check_evaluation_order(system, bag)
    _check_model_order(system, bag)
    _check_nesting(system, bag)
    _check_ownership(system, bag)
    _check_shapes(system, bag)
    _check_rate_ranges(system, bag)
    _warn_no_gradient(system, bag)
    _warn_task_chunks(system, bag, seq_len)
    _warn_no_parallel_form(system, bag)
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
    sizes = {name: system.params.get(name) for name in ("d", "heads", "vocab")}
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, (int, float)) or not float(value).is_integer() or value < 1):
            bag.error("E016", f"parameter `{name}` must be a positive integer, not {value}", system.span)
            return
    d, heads = sizes["d"], sizes["heads"] or 1
    if isinstance(d, (int, float)) and isinstance(heads, (int, float)) and int(d) % int(heads) != 0:
        bag.error(
            "E025",
            f"`d = {d}` is not divisible by `heads = {heads}`",
            system.span,
            "each head gets d / heads channels; choose sizes that divide",
        )


def _check_evaluation_order(system: ir.System, bag: DiagnosticBag) -> None:
    try:
        cycle = nx.find_cycle(evaluation_graph(system))
    except nx.NetworkXNoCycle:
        return
    sites = [site_label(u) for u, _ in cycle]
    first_level = cycle[0][0][1]
    level = system.level(first_level)
    labels = [Label(system.level(node[1]).span, site_label(node)) for node, _ in cycle[1:] if node[1] != first_level]
    bag.error(
        "E020",
        "evaluation-order cycle: " + " -> ".join([*sites, sites[0]]),
        _first_reading_statement(level),
        "generate keys, values and rates from a `boundary` or `before` read "
        "(e.g. `M(x, read = boundary)`), never from a level's `online` state that needs this update",
        labels=labels,
    )


def _first_reading_statement(level: ir.Level) -> Span:
    for role, expr in level.roles.items():
        if ir.expr_reads(expr):
            return level.spans.get(role, level.span)
    return level.spans.get("optimizer", level.span)


def _model_levels(node: ir.Node) -> Iterator[str]:
    """Level uses in model order (one repetition is enough: the order inside a block)."""
    if isinstance(node, ir.LevelNode):
        yield node.level
    elif isinstance(node, (ir.SeqNode, ir.ParallelNode)):
        for item in node.items:
            yield from _model_levels(item)
    elif isinstance(node, (ir.RepeatNode, ir.ResidualNode)):
        yield from _model_levels(node.body)
    elif isinstance(node, ir.GateNode):
        yield from _model_levels(node.value)
        yield from _model_levels(node.gate)
    elif isinstance(node, ir.PrefixNode):
        yield from _model_levels(node.memory)
        yield from _model_levels(node.attention)


def _check_model_order(system: ir.System, bag: DiagnosticBag) -> None:
    """Rule 4: a level that reads another's `online` state needs that level's update at t to come first,
    but a level later in the model updates on this level's output: the value does not exist yet."""
    order: dict[str, int] = {}
    for position, name in enumerate(_model_levels(system.model)):
        order.setdefault(name, position)
    for level in system.levels:
        for role, expr in level.inputs().items():
            for read in ir.expr_reads(expr):
                later = order.get(read.level, -1) > order.get(level.name, 10**9)
                if read.mode == "online" and read.level != level.name and later:
                    producer = system.level(read.level)
                    bag.error(
                        "E028",
                        f"`{level.name}`'s {role} read `{read.level}`'s online state at token t, but "
                        f"`{read.level}` comes later in the model and updates on `{level.name}`'s output",
                        read.span or level.spans.get(role, level.span),
                        f"read `{read.level}` at its `boundary` or `before` state",
                        labels=[Label(producer.span, f"`{read.level}` is declared here")],
                    )


def _check_nesting(system: ir.System, bag: DiagnosticBag) -> None:
    by_name = {lv.name: lv for lv in system.levels}
    owners = nx.DiGraph((lv.name, lv.owner) for lv in system.levels if lv.owner in by_name)
    declared = {lv.name: i for i, lv in enumerate(system.levels)}
    for found in nx.simple_cycles(owners):
        first = min(range(len(found)), key=lambda i: declared[found[i]])  # deterministic: start at the first
        cycle = found[first:] + found[:first]  # level declared (networkx's start depends on set order)
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
        label = [Label(outer.spans.get("update", outer.span), f"`{outer.name}` updates here")]
        if fi.order_key() > fo.order_key():
            bag.error(
                "E021",
                f"level `{inner.name}` ({fi.describe()}) is nested in `{outer.name}` ({fo.describe()}) "
                "but updates less often",
                where,
                f"a nested level must be at least as fast as its owner: make `{inner.name}` update "
                f"{fo.describe()} or faster, or nest it elsewhere",
                labels=label,
            )
        elif fi.unit == fo.unit == "token" and fo.count % fi.count != 0:
            bag.error(
                "E022",
                f"level `{inner.name}` updates every {fi.count} tokens inside `{outer.name}`, which updates "
                f"every {fo.count} tokens: {fi.count} does not divide {fo.count}",
                where,
                f"choose a chunk that divides {fo.count} (e.g. {_divisor_near(fo.count, fi.count)})",
                labels=label,
            )


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def outer_roots(system: ir.System) -> list[ir.Level]:
    return [lv for lv in system.levels if lv.outer is not None and lv.owner is None]


def default_owner(system: ir.System) -> ir.Level | None:
    """The outermost optimizer level that trains whatever no selector claims (the model's layers)."""
    roots = outer_roots(system)
    unselective = [r for r in roots if not r.selectors or "all" in r.selectors]
    if len(unselective) == 1:
        return unselective[0]
    return roots[0] if len(roots) == 1 else None


def _check_ownership(system: ir.System, bag: DiagnosticBag) -> None:
    roots = outer_roots(system)
    if not roots:
        bag.error(
            "E023",
            f"no level trains the parameters of `{system.name}`",
            system.span,
            "add e.g. `level pretrain { update every step; optimizer adamw(lr = 3e-3) }`",
        )
        return
    claims: dict[str, ir.Level] = {}
    unselective = [r for r in roots if not r.selectors]
    if len(unselective) > 1:
        bag.error(
            "E023",
            "the model's parameters would belong to several levels: " + ", ".join(f"`{r.name}`" for r in unselective),
            unselective[1].span,
            "keep one outermost `every step` level, or give each a `params` selector "
            "(e.g. `params matrices` and `params embeddings, gains`)",
            labels=[Label(unselective[0].span, f"`{unselective[0].name}` also claims them")],
        )
        return
    for root in roots:
        for selector in root.selectors or ["all"]:
            covered = {"matrices", "embeddings", "gains", "biases", "states"} if selector == "all" else {selector}
            for part in covered:
                if part in claims and claims[part] is not root:
                    bag.error(
                        "E023",
                        f"parameters `{part}` are claimed by both `{claims[part].name}` and `{root.name}`",
                        root.spans.get("params", root.span),
                        "each parameter belongs to exactly one optimizer level: make the selectors disjoint",
                        labels=[Label(claims[part].spans.get("params", claims[part].span), "the other claim")],
                    )
                claims.setdefault(part, root)
    missing = {"matrices", "embeddings", "gains"} - claims.keys()
    if missing and all(r.selectors for r in roots):
        bag.error(
            "E023",
            f"no optimizer level trains the {', '.join(sorted(missing))}",
            roots[0].spans.get("params", roots[0].span),
            "add them to a `params` selector, or use `params all` on one level",
        )


def _check_shapes(system: ir.System, bag: DiagnosticBag) -> None:
    for level in system.levels:
        memory = level.memory
        if memory is None or level.inner is None:
            continue
        for name, rate in level.rates().items():
            if rate.shape == "channel" and name != "retain":
                bag.error(
                    "E025",
                    f"`{name}` cannot be per channel: only the retention α acts along channels (M·diag(α))",
                    level.spans.get("optimizer", level.span),
                    f"make `{name}` per head",
                )
        if level.objective is not None and level.objective.kind == "task" and memory.kind != "mlp":
            bag.error(
                "E025",
                "`objective task` trains an MLP memory used as a layer (CMS)",
                level.spans.get("objective", level.span),
                "use `memory mlp(depth = 2, expand = 4, residual)`",
            )


# The range each rate must stay in, and what goes wrong outside it.
RATE_BOUNDS = {
    "lr": ((0.0, math.inf), "a negative learning rate climbs the objective instead of descending it"),
    "retain": ((0.0, 1.0), "a retention above 1 grows the memory without bound, below 0 flips its sign"),
    "momentum": ((0.0, 1.0), "a momentum above 1 grows without bound, below 0 flips its sign"),
}
RATE_HINTS = {
    "lr": "squash it into a range, e.g. `sigmoid(linear(x)) * 0.01`",
    "retain": "squash it into [0, 1], e.g. `1 - sigmoid(linear(x) - 8)` (α near 1 keeps almost everything)",
    "momentum": "squash it into [0, 1], e.g. `sigmoid(linear(x))`",
}


def _check_rate_ranges(system: ir.System, bag: DiagnosticBag) -> None:
    for level in system.levels:
        for name, rate in level.rates().items():
            (low, high), harm = RATE_BOUNDS[name]
            found = value_range(rate.expr)
            if low <= found[0] and found[1] <= high:
                continue
            span = rate.span or level.spans.get("optimizer", level.span)
            bound = describe((low, high))
            if ir.is_constant(rate.expr):
                message = f"`{name}` of `{level.name}` is {found[0]:g}, outside {bound}: {harm}"
                bag.error("E016", message, span, f"use a value in {bound}")
            else:
                message = f"`{name}` of `{level.name}` can take values in {describe(found)}, outside {bound}: {harm}"
                bag.warning("W004", message, span, RATE_HINTS[name])


def _warn_no_gradient(system: ir.System, bag: DiagnosticBag) -> None:
    for level in system.levels:
        if level.gradient.mode != "stop" or level.inner is None:
            continue
        roles: tuple[ir.Role, ...] = ("keys", "values", "targets")
        fed: list[str] = [r for r in roles if r in level.roles and not _is_read_only(level.roles[r])]
        fed += [name for name, rate in level.rates().items() if not ir.is_constant(rate.expr)]
        if fed:
            bag.warning(
                "W001",
                f"with `outer gradient stop`, the projections of `{level.name}`'s {', '.join(fed)} get no "
                "gradient (they only feed updates)",
                level.spans.get("outer gradient", level.span),
                "use `outer gradient through` or `truncate k` to train them",
            )


def _is_read_only(expr: ir.Expr) -> bool:
    """An expression with no projection of its own (only reads of other levels)."""
    if isinstance(expr, ir.Linear):
        return False
    if isinstance(expr, (ir.Fn, ir.Read)):
        return _is_read_only(expr.arg)
    if isinstance(expr, ir.Bin):
        return _is_read_only(expr.left) and _is_read_only(expr.right)
    return True


def _warn_task_chunks(system: ir.System, bag: DiagnosticBag, seq_len: int | None) -> None:
    length = seq_len or system.params.get("seq_len")
    if not isinstance(length, (int, float)):
        return
    for level in system.levels:
        if level.objective is not None and level.objective.kind == "task" and level.update.count >= length:
            bag.warning(
                "W002",
                f"`{level.name}` updates every {level.update.count} tokens but training sequences have "
                f"{int(length)}: it never updates inside a sequence",
                level.spans.get("update", level.span),
                "use a smaller chunk, longer sequences, or `update every N steps` to learn across steps",
            )


def _warn_no_parallel_form(system: ir.System, bag: DiagnosticBag) -> None:
    """W003 for every in-context level that this runtime runs as a scan (one token at a time; compiled where it
    runs the scan fallback, ``runtime/ops/compiled_scan.py``)."""
    for level in system.levels:
        if level.memory is None or level.inner is None or level.objective is None or level.objective.kind == "task":
            continue
        if level.memory.kind == "gradients":  # steps once per training step: there is no sequence to scan
            continue
        key = (level.memory.kind, level.inner.kind)
        mapped = level.memory.kind == "mlp" and level.memory.depth == 1
        if mapped:  # M(x) = [x +] [LN](W x) runs as a matrix memory with an output map
            key = ("matrix", level.inner.kind)
        chunks = PARALLEL_FORMS.get(key, set())
        nonlinear = key == ("matrix", "dgd") and (level.objective.kind in ("lp", "huber") or mapped)
        # momentum_gd on a matrix runs in parallel with decay after and no output map only
        output_map = mapped and (level.memory.residual or level.memory.norm != "none")
        momentum_scan = key == ("matrix", "momentum_gd") and (output_map or level.inner.decay == "before")
        # A windowed objective runs in parallel through `gd`'s virtual tokens only.
        windowed = (level.objective.window or 1) > 1 and level.inner.kind != "gd"
        if not nonlinear and not momentum_scan and not windowed and (chunks is None or level.update.count in chunks):
            continue
        why = (
            f"`{level.inner.kind}` with `{level.objective.kind}`"
            if nonlinear
            else f"`{level.inner.kind}` on a {level.memory.kind} memory"
        )
        if windowed:
            why = f"a windowed objective with `{level.inner.kind}`"
        elif momentum_scan:
            why = "`momentum_gd` with an output map" if output_map else "`momentum_gd` with `decay before`"
        if level.update.count == 1 and level.memory.kind == "mlp":
            why = "an MLP memory updated every token"
        hint = NEAREST_PARALLEL.get(key, "`gd`, `momentum_gd` (MLP) or `dgd` run in parallel")
        # Every scan fallback runs in torch.compile'd blocks of tokens (runtime/ops/compiled_scan.py).
        bag.warning(
            "W003",
            f"`{level.name}` has no parallel form here ({why}): it runs as a compiled scan, token by token",
            level.spans.get("optimizer", level.span),
            hint,
        )

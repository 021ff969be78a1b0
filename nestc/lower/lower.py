"""Lowering: the checked pydantic IR to the runtime's own plan schema (`nestc_runtime.plan`).

This is the only place that knows both sides. It expands repeated blocks into level instances
(`memory[0]`, `memory[1]`, ...), sizes every level, and assigns parameters to outer optimizer levels.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from nestc_runtime.plan import LayerPlan, LevelPlan, Plan, RatePlan

from ..diagnostics import CompileError, DiagnosticBag, Span
from ..ir import models as ir
from .outer import is_gradient_memory, optimizer_groups, reject_outer

RUNTIME_LAYERS = {"embed", "head", "linear", "rmsnorm", "layernorm", "l2norm", "swiglu", "silu"}
RUNTIME_FUNCTIONS = {"sigmoid", "silu", "softplus", "tanh", "exp", "relu", "l2norm", "mean", "rope", "conv"}
RUNTIME_MEMORIES = {"matrix", "mlp", "kv", "persistent"}
RUNTIME_OPTIMIZERS = {"gd", "momentum_gd", "dgd", "newton_schulz", "delta_momentum"}


def lower(system: ir.System, source_text: str = "") -> Plan:
    bag = DiagnosticBag()
    _reject_unsupported(system, bag)
    bag.raise_if_errors()
    stateless = ("persistent", "gradients")  # persistent tokens live in attention; gradients in the optimizer
    running = (lv for lv in system.levels if lv.memory is not None and lv.memory.kind not in stateless)
    levels = {lv.name: _level_plan(system, lv) for lv in running}
    for name in _prefixed_attention(system.model):
        # Inside `prefix`, attention runs over the stream [h_t, x_t, h_{t+1}, x_{t+1}, ...]: twice as long.
        options = levels[name].options
        options["interleaved"] = True
        if "segment" in options:
            options["segment"] *= 2
        if "window" in options:
            options["window"] *= 2
    layers = _with_companions(system, _instantiate(_layers(system.model)))
    bag.raise_if_errors()
    d, vocab = system.d, int(system.number("vocab"))
    return Plan(
        system=system.name,
        params={k: list(v) if isinstance(v, list) else v for k, v in system.params.items()},
        d=d,
        vocab=vocab,
        eod=vocab - 1,
        levels=levels,
        layers=layers,
        optimizers=optimizer_groups(system),
        window=None,
        source_hash=hashlib.sha256(source_text.encode()).hexdigest()[:16],
    )


def _unsupported(bag: DiagnosticBag, what: str, span: Span | None) -> None:
    hint = "`nestc check` accepts it; the runtime issue adds it"
    bag.error("E040", f"{what} is not supported by the runtime yet", span, hint)


def _reject_unsupported(system: ir.System, bag: DiagnosticBag) -> None:
    """Everything the language accepts but this runtime cannot run yet, each named precisely."""
    for level in system.levels:
        where = level.span
        memory = level.memory
        if memory is None or is_gradient_memory(level):  # outer levels: reject_outer
            continue
        if memory.kind not in RUNTIME_MEMORIES:
            _unsupported(bag, f"memory `{memory.kind}`", level.spans.get("memory", where))
        two_layer = memory.depth == 2 and memory.residual
        if memory.kind == "mlp" and (memory.depth not in (1, 2) or not (two_layer or memory.depth == 1)):
            _unsupported(
                bag,
                "an MLP memory other than depth 1 or a residual 2-layer one",
                level.spans.get("memory", where),
            )
        if memory.kind == "mlp" and memory.norm == "rmsnorm":
            what = "an MLP memory with `norm = rmsnorm` (none or layernorm run)"
            _unsupported(bag, what, level.spans.get("memory", where))
        windowed = level.objective is not None and (level.objective.window or 1) > 1
        if windowed and level.inner is not None and level.inner.kind == "dgd":
            _unsupported(
                bag,
                "a windowed objective with `dgd` (its factor (αI − η k kᵀ) takes one key)",
                level.spans.get("objective", where),
            )
        if memory.kind == "persistent" and level.update.unit != "step":
            _unsupported(bag, "a persistent memory that does not learn every step", level.spans.get("update", where))
        if level.objective is not None and level.objective.kind not in ("dot", "l2", "lp", "huber", "task"):
            _unsupported(bag, f"objective `{level.objective.kind}`", level.spans.get("objective", where))
        if level.objective is not None and level.objective.kind == "task":
            if level.gradient.mode != "stop":
                _unsupported(
                    bag,
                    "`objective task` with an outer gradient other than `stop` (second order)",
                    level.spans.get("outer gradient", where),
                )
            if level.inner is not None and not ir.is_constant(level.inner.retain.expr):
                _unsupported(bag, "a data-dependent retention on a task level", level.spans.get("optimizer", where))
        if level.inner is not None and level.inner.kind not in RUNTIME_OPTIMIZERS:
            _unsupported(bag, f"inner optimizer `{level.inner.kind}`", level.spans.get("optimizer", where))
        if level.inner is not None and level.inner.kind == "dgd" and level.inner.both and memory.kind != "mlp":
            _unsupported(bag, "`dgd(both)` on a one-map memory (write `dgd`)", level.spans.get("optimizer", where))
        if level.inner is not None and level.inner.kind == "delta_momentum" and level.inner.decay == "before":
            _unsupported(
                bag,
                "`decay before` with `delta_momentum` (its retention acts on the momentum)",
                level.spans.get("decay", where),
            )
        if memory.kind == "mlp" and level.inner is not None and level.inner.decay == "before":
            _unsupported(bag, "`decay before` on an MLP memory", level.spans.get("decay", where))
        if level.read.every is not None:
            _unsupported(bag, "a coarser read boundary", level.spans.get("read", where))
        for role, expr in level.inputs().items():
            problem = _unsupported_expr(expr, system)
            if problem:
                _unsupported(bag, problem, level.spans.get(role, level.spans.get("optimizer", where)))
    _reject_unsupported_nodes(system.model, bag)
    reject_outer(system, bag)


def _unsupported_expr(expr: ir.Expr, system: ir.System | None = None) -> str | None:
    if isinstance(expr, ir.Read) and expr.mode != "boundary":
        return f"a `{expr.mode}` read of `{expr.level}` inside an expression (only `boundary` reads run yet)"
    if isinstance(expr, ir.Read) and system is not None:
        memory = system.level(expr.level).memory
        if memory is None or memory.kind not in ("matrix", "mlp"):
            return f"reading the `{memory.kind if memory else 'outer'}` level `{expr.level}` inside an expression"
    if isinstance(expr, ir.Fn) and expr.fn not in RUNTIME_FUNCTIONS:
        return f"the function `{expr.fn}`"
    if isinstance(expr, ir.Linear) and not isinstance(expr.arg, ir.Input):
        return "`linear` of anything but `x`"
    children = [getattr(expr, k) for k in ("arg", "left", "right") if hasattr(expr, k)]
    return next((p for p in (_unsupported_expr(c, system) for c in children) if p), None)


def _reject_unsupported_nodes(node: ir.Node, bag: DiagnosticBag) -> None:
    if isinstance(node, ir.LayerNode) and node.kind not in RUNTIME_LAYERS:
        _unsupported(bag, f"the layer `{node.kind}`", node.span)
    elif isinstance(node, ir.LevelNode) and node.read is not None and node.read.mode != "boundary":
        _unsupported(bag, f"a second read site at the `{node.read.mode}` state", node.span)
    elif isinstance(node, ir.PrefixNode):
        attention, memory = _single_level(node.attention), _single_level(node.memory)
        if attention is None or memory is None or memory.read is None:
            _unsupported(bag, "`prefix` of anything but an attention level and a boundary read of a level", None)
    elif isinstance(node, (ir.SeqNode, ir.ParallelNode)):
        for item in node.items:
            _reject_unsupported_nodes(item, bag)
    elif isinstance(node, (ir.RepeatNode, ir.ResidualNode)):
        _reject_unsupported_nodes(node.body, bag)
    elif isinstance(node, ir.GateNode):
        _reject_unsupported_nodes(node.value, bag)
        _reject_unsupported_nodes(node.gate, bag)


def _expr(expr: ir.Expr) -> dict[str, Any]:
    return expr.model_dump(exclude={"span"}, exclude_none=True)


def _level_plan(system: ir.System, level: ir.Level) -> LevelPlan:
    memory = level.memory
    assert memory is not None
    heads = int(system.number("heads", 1)) if memory.per_head else 1
    d_head = system.d // heads
    options: dict[str, Any] = {}
    if memory.kind == "mlp":
        options = {
            "depth": memory.depth,
            "expand": memory.expand,
            "residual": memory.residual,
            "norm": memory.norm,
            "activation": memory.activation,
        }
    elif memory.kind == "kv":
        options = {k: v for k, v in (("window", memory.window), ("segment", memory.segment)) if v is not None}
        if memory.persistent is not None:
            options["persistent"] = system.level(memory.persistent).memory.tokens  # type: ignore[union-attr]
    inner = level.inner
    return LevelPlan(
        name=level.name,
        kind=memory.kind,
        heads=heads,
        d_key=d_head,
        d_value=d_head,
        chunk=level.update.count,
        read=level.read.mode,
        gradient=level.gradient.mode,
        truncate_k=level.gradient.k,
        exprs={role: _expr(expr) for role, expr in level.roles.items()},
        rates={name: RatePlan(expr=_expr(rate.expr), shape=rate.shape) for name, rate in level.rates().items()},
        objective=level.objective.kind if level.objective else None,
        optimizer=inner.kind if inner else None,
        decay=inner.decay if inner else "after",
        options=options,
        stopgrad_targets=level.stopgrad_targets,
        p=level.objective.p if level.objective else None,
        delta=level.objective.delta if level.objective else None,
        steps=inner.steps if inner else None,
        lam=inner.lam if inner else None,
        window=(level.objective.window or 1) if level.objective else 1,
        dgd_both=bool(inner and inner.kind == "dgd" and inner.both),
    )


def _layers(node: ir.Node, group: str | None = None) -> list[LayerPlan]:
    """Flatten a composition: sequences inline, repeats expand, residuals nest."""
    if isinstance(node, ir.SeqNode):
        return [layer for item in node.items for layer in _layers(item, group)]
    if isinstance(node, ir.RepeatNode):
        return [layer for _ in range(node.count) for layer in _layers(node.body, node.name)]
    if isinstance(node, ir.ResidualNode):
        return [LayerPlan(op="residual", name="residual", body=_layers(node.body, group), group=group)]
    if isinstance(node, ir.GateNode):
        gate = _layers(node.gate, group)
        return [LayerPlan(op="gate", name="gate", body=_layers(node.value, group), branches=[gate], group=group)]
    if isinstance(node, ir.ParallelNode):
        branches = [_layers(item, group) for item in node.items]
        return [LayerPlan(op="parallel", name="parallel", branches=branches, group=group)]
    if isinstance(node, ir.LevelNode) and node.read is not None:
        options = {"mode": node.read.mode, "every": node.read.every or 1}
        return [LayerPlan(op="read", name=node.level, level=node.level, group=group, options=options)]
    if isinstance(node, ir.LevelNode):
        return [LayerPlan(op="memory", name=node.level, level=node.level, group=group)]
    if isinstance(node, ir.PrefixNode):
        body, branch = _layers(node.attention, group), _layers(node.memory, group)
        return [LayerPlan(op="prefix", name="prefix", body=body, branches=[branch], group=group)]
    assert isinstance(node, ir.LayerNode)
    return [LayerPlan(op=node.kind, name=node.kind, group=group)]


def _instantiate(layers: list[LayerPlan]) -> list[LayerPlan]:
    """Name level instances: a level used once keeps its name, a repeated one becomes `name[i]`."""
    uses = Counter(layer.level for layer in _walk(layers) if layer.op == "memory")
    seen: Counter[str] = Counter()
    for layer in _walk(layers):
        if layer.level is None or uses[layer.level] <= 1:
            continue
        if layer.op == "read":  # another read site of the instance its block uses next
            layer.name = f"{layer.level}[{seen[layer.level]}]"
        elif layer.op == "memory":
            layer.name = f"{layer.level}[{seen[layer.level]}]"
            seen[layer.level] += 1
    return layers


def _prefixed_attention(node: ir.Node) -> list[str]:
    if isinstance(node, ir.PrefixNode):
        level = _single_level(node.attention)
        return [level.level] if level is not None else []
    children: list[ir.Node] = []
    if isinstance(node, (ir.SeqNode, ir.ParallelNode)):
        children = list(node.items)
    elif isinstance(node, (ir.RepeatNode, ir.ResidualNode)):
        children = [node.body]
    elif isinstance(node, ir.GateNode):
        children = [node.value, node.gate]
    return [name for child in children for name in _prefixed_attention(child)]


def _single_level(node: ir.Node) -> ir.LevelNode | None:
    if isinstance(node, ir.SeqNode) and len(node.items) == 1:
        return _single_level(node.items[0])
    return node if isinstance(node, ir.LevelNode) else None


def _with_companions(system: ir.System, layers: list[LayerPlan]) -> list[LayerPlan]:
    """Give each level use the instances of the levels it reads (directly or through them), named like
    `nestc show` names them: `M_k[2]` beside `M_memory[2]`; its own level maps to itself."""
    for layer in _walk(layers):
        if layer.op != "memory" or layer.level is None:
            continue
        read = _reads_closure(system, layer.level)
        if not read:
            continue
        suffix = layer.name[len(layer.level) :]  # "" or "[i]"
        layer.companions = {name: (layer.name if name == layer.level else f"{name}{suffix}") for name in read}
        layer.companions.setdefault(layer.level, layer.name)
    return layers


def _reads_closure(system: ir.System, start: str) -> list[str]:
    """Every level read by `start`'s expressions, and by theirs, in a stable order."""
    seen: list[str] = []
    frontier = [start]
    while frontier:
        level = system.level(frontier.pop(0))
        for expr in level.inputs().values():
            for read in ir.expr_reads(expr):
                if read.level not in seen:
                    seen.append(read.level)
                    frontier.append(read.level)
    return seen


def _walk(layers: list[LayerPlan]) -> list[LayerPlan]:
    out = []
    for layer in layers:
        out.append(layer)
        out.extend(_walk(layer.body))
        for branch in layer.branches:
            out.extend(_walk(branch))
    return out


__all__ = ["lower", "CompileError"]

"""Lowering: the checked pydantic IR to the runtime's own plan schema (`nestc_runtime.plan`).

This is the only place that knows both sides. It expands repeated blocks into level instances
(`memory[0]`, `memory[1]`, ...), sizes every level, and assigns parameters to outer optimizer levels.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from nestc_runtime.plan import LayerPlan, MemoryLevelPlan, OptimizerGroupPlan, Plan, RatePlan

from ..checks.rules import default_owner
from ..diagnostics import CompileError, DiagnosticBag
from ..ir import models as ir


def lower(system: ir.System, source_text: str = "") -> Plan:
    bag = DiagnosticBag()
    levels = {lv.name: _level_plan(system, lv, bag) for lv in system.levels if lv.in_context}
    layers = _instantiate(_layers(system.model))
    bag.raise_if_errors()
    d, vocab = int(system.params["d"]), int(system.params["vocab"])
    return Plan(
        system=system.name,
        params=dict(system.params),
        d=d,
        vocab=vocab,
        eod=vocab - 1,
        levels={k: v for k, v in levels.items() if v is not None},
        layers=layers,
        optimizers=_optimizer_groups(system),
        window=None,
        source_hash=hashlib.sha256(source_text.encode()).hexdigest()[:16],
    )


def _expr(expr: ir.Expr, bag: DiagnosticBag, level: ir.Level) -> dict[str, Any]:
    for read in ir.expr_reads(expr):
        bag.error(
            "E026",
            f"`{level.name}` reads level `{read.level}` inside an expression; the runtime does not "
            "run level-generated inputs yet",
            read.span,
            "generate keys, values and rates from `x`",
        )
    return expr.model_dump(exclude={"span"})


def _level_plan(system: ir.System, level: ir.Level, bag: DiagnosticBag) -> MemoryLevelPlan | None:
    assert level.inner is not None and level.objective is not None
    heads = int(system.params.get("heads", 1)) if level.memory and level.memory.per_head else 1
    d_head = int(system.params["d"]) // heads
    roles = {role: _expr(level.roles[role], bag, level) for role in ("keys", "values")}
    queries = _expr(level.roles["queries"], bag, level) if "queries" in level.roles else roles["keys"]
    return MemoryLevelPlan(
        name=level.name,
        heads=heads,
        d_key=d_head,
        d_value=d_head,
        objective=level.objective.kind,
        optimizer=level.inner.kind,
        decay=level.inner.decay,
        chunk=level.update.count,
        read=level.read.mode,
        gradient=level.gradient.mode,
        truncate_k=level.gradient.k,
        queries=queries,
        keys=roles["keys"],
        values=roles["values"],
        lr=RatePlan(expr=_expr(level.inner.lr.expr, bag, level), shape=level.inner.lr.shape),
        retain=RatePlan(expr=_expr(level.inner.retain.expr, bag, level), shape=level.inner.retain.shape),
    )


def _layers(node: ir.Node, group: str | None = None) -> list[LayerPlan]:
    """Flatten a composition: sequences inline, repeats expand, residuals nest."""
    if isinstance(node, ir.SeqNode):
        return [layer for item in node.items for layer in _layers(item, group)]
    if isinstance(node, ir.RepeatNode):
        return [layer for _ in range(node.count) for layer in _layers(node.body, node.name)]
    if isinstance(node, ir.ResidualNode):
        return [LayerPlan(op="residual", name="residual", body=_layers(node.body, group), group=group)]
    if isinstance(node, ir.LevelNode):
        return [LayerPlan(op="memory", name=node.level, level=node.level, group=group)]
    return [LayerPlan(op=node.kind, name=node.kind, group=group)]


def _instantiate(layers: list[LayerPlan]) -> list[LayerPlan]:
    """Name level instances: a level used once keeps its name, a repeated one becomes `name[i]`."""
    uses = Counter(layer.level for layer in _walk(layers) if layer.op == "memory")
    seen: Counter[str] = Counter()
    for layer in _walk(layers):
        if layer.op == "memory" and layer.level is not None and uses[layer.level] > 1:
            layer.name = f"{layer.level}[{seen[layer.level]}]"
            seen[layer.level] += 1
    return layers


def _walk(layers: list[LayerPlan]) -> list[LayerPlan]:
    out = []
    for layer in layers:
        out.append(layer)
        out.extend(_walk(layer.body))
    return out


def _optimizer_groups(system: ir.System) -> list[OptimizerGroupPlan]:
    root = default_owner(system)
    groups = []
    for level in system.levels:
        if level.outer is None:
            continue
        owned = [lv.name for lv in system.levels if lv.in_context and lv.owner == level.name]
        every = level.update.count if level.update.unit == "step" else 0
        groups.append(
            OptimizerGroupPlan(
                name=level.name,
                kind=level.outer.kind,
                hyper=dict(level.outer.hyper),
                every_steps=every,
                owns_levels=owned,
                default=root is not None and level.name == root.name,
            )
        )
    return groups


__all__ = ["lower", "CompileError"]

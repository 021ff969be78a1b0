"""`nestc show`: a table of a system's level instances, computed from the IR."""

from __future__ import annotations

import io
from typing import Any

from .checks.rules import default_owner
from .ir import models as ir
from .ir.instances import instances
from .ir.sizes import layer_parameters, level_parameters

COLUMNS = ("instance", "memory", "objective", "optimizer", "frequency", "read", "gradient", "owner", "params")


def _memory(level: ir.Level) -> str:
    memory = level.memory
    if memory is None:
        return "-"
    detail = {
        "mlp": f"mlp(depth {memory.depth}{'' if memory.depth == 1 else f', x{memory.expand:g}'}"
        f"{', residual' if memory.residual else ''}{'' if memory.norm == 'none' else ', ' + memory.norm})",
        "kv": f"kv(window {memory.window})" if memory.window else "kv",
        "persistent": f"persistent({memory.tokens})",
    }.get(memory.kind, memory.kind)
    return detail + (" per head" if memory.per_head else "")


def _objective(level: ir.Level) -> str:
    if level.objective is None:
        return "-"
    window = level.objective.window
    return level.objective.kind + (f" (window {window})" if window and window > 1 else "")


def _optimizer(level: ir.Level) -> str:
    if level.inner is not None:
        return level.inner.kind + (" (decay before)" if level.inner.decay == "before" else "")
    if level.outer is not None:
        return level.outer.kind + (f" [{', '.join(level.selectors)}]" if level.selectors else "")
    return "-"


def _read(level: ir.Level) -> str:
    if level.memory is None:
        return "-"
    every = f" every {level.read.every}" if level.read.every else ""
    return level.read.mode + every


def _gradient(level: ir.Level) -> str:
    if level.memory is None:
        return "-"
    mode = level.gradient
    return f"truncate {mode.k}" if mode.mode == "truncate" else mode.mode


def _model_layer_parameters(system: ir.System, node: ir.Node) -> int:
    d, vocab = system.d, int(system.number("vocab"))
    if isinstance(node, ir.LayerNode):
        return layer_parameters(node.kind, d, vocab)
    if isinstance(node, (ir.SeqNode, ir.ParallelNode)):
        return sum(_model_layer_parameters(system, i) for i in node.items)
    if isinstance(node, ir.RepeatNode):
        return node.count * _model_layer_parameters(system, node.body)
    if isinstance(node, ir.ResidualNode):
        return _model_layer_parameters(system, node.body)
    if isinstance(node, ir.GateNode):
        return _model_layer_parameters(system, node.value) + _model_layer_parameters(system, node.gate) + d * d
    if isinstance(node, ir.PrefixNode):
        return _model_layer_parameters(system, node.attention) + _model_layer_parameters(system, node.memory)
    return 0


def level_table(system: ir.System) -> list[dict[str, Any]]:
    """One row per level instance; the default owner's row counts the model's own layers."""
    root = default_owner(system)
    rows = []
    for inst in instances(system):
        level = system.level(inst.level)
        params = level_parameters(system, level)
        if root is not None and level.name == root.name:
            params += _model_layer_parameters(system, system.model)
        owner = level.owner or (root.name if level.memory is not None and root is not None else "-")
        rows.append(
            {
                "instance": inst.name,
                "memory": _memory(level),
                "objective": _objective(level),
                "optimizer": _optimizer(level),
                "frequency": level.update.describe(),
                "read": _read(level),
                "gradient": _gradient(level),
                "owner": owner,
                "params": params,
                "group": inst.group,
            }
        )
    return rows


def render_table(system: ir.System, rows: list[dict[str, Any]]) -> str:
    total = sum(r["params"] for r in rows)
    title = f"system {system.name}: {len(rows)} level instances, {total:,} parameters"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the plain fallback
        lines = [title, "  ".join(COLUMNS)]
        lines += ["  ".join(str(r[c]) for c in COLUMNS) for r in rows]
        return "\n".join(lines)
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column == "params" else "left")
    for row in rows:
        table.add_row(*(f"{row[c]:,}" if c == "params" else str(row[c]) for c in COLUMNS))
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(table)
    return buffer.getvalue().rstrip()

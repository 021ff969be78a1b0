"""Level instances: every use of a level in the expanded model (`block * 4` gives `memory[0]` ...
`memory[3]`), the names the runtime, `nestc show` and pictures share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from . import models as ir


@dataclass(frozen=True)
class Instance:
    name: str  # `memory[2]`, or the level's own name when it is used once
    level: str  # the level it instantiates
    group: str | None  # the repeated binding it belongs to (`block`), for grouping in displays
    index: int | None  # its repetition index inside that group


def _uses(node: ir.Node, group: str | None, index: int | None) -> Iterator[tuple[str, str | None, int | None]]:
    if isinstance(node, ir.LevelNode):
        yield node.level, group, index
    elif isinstance(node, (ir.SeqNode, ir.ParallelNode)):
        for item in node.items:
            yield from _uses(item, group, index)
    elif isinstance(node, ir.RepeatNode):
        for i in range(node.count):
            yield from _uses(node.body, node.name, i)
    elif isinstance(node, ir.ResidualNode):
        yield from _uses(node.body, group, index)
    elif isinstance(node, ir.GateNode):
        yield from _uses(node.value, group, index)
        yield from _uses(node.gate, group, index)
    elif isinstance(node, ir.PrefixNode):
        yield from _uses(node.memory, group, index)
        yield from _uses(node.attention, group, index)


def instances(system: ir.System) -> list[Instance]:
    """Every level instance of the model in order, then levels that are only read by others or only
    optimize (one instance each)."""
    uses = list(_uses(system.model, None, None))
    counts = Counter(level for level, _, _ in uses)
    seen: Counter[str] = Counter()
    out = []
    for level, group, index in uses:
        name = f"{level}[{seen[level]}]" if counts[level] > 1 else level
        seen[level] += 1
        out.append(Instance(name, level, group, index))
    for declared in system.levels:
        if declared.name not in counts:
            out.append(Instance(declared.name, declared.name, None, None))
    return out

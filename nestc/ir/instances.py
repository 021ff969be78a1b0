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
        if node.read is None:  # another read site of an instance is not a new instance
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


def _readers(system: ir.System) -> dict[str, set[str]]:
    """level -> the levels that read it (in an expression, or as attention's persistent prefix)."""
    readers: dict[str, set[str]] = {}
    for level in system.levels:
        read = [r.level for expr in level.inputs().values() for r in ir.expr_reads(expr)]
        if level.memory is not None and level.memory.persistent:
            read.append(level.memory.persistent)
        for name in read:
            if name != level.name:
                readers.setdefault(name, set()).add(level.name)
    return readers


def instances(system: ir.System) -> list[Instance]:
    """Every level instance of the model in order; then levels used only through other levels (a memory
    that generates another's keys, persistent tokens) get one instance per instance of their reader; then
    levels that only optimize (one instance each)."""
    uses = list(_uses(system.model, None, None))
    counts = Counter(level for level, _, _ in uses)
    seen: Counter[str] = Counter()
    out = []
    for level, group, index in uses:
        name = f"{level}[{seen[level]}]" if counts[level] > 1 else level
        seen[level] += 1
        out.append(Instance(name, level, group, index))
    readers = _readers(system)
    for declared in system.levels:
        if declared.name in counts:
            continue
        reader_uses = _first_model_reader(declared.name, readers, out)
        if len(reader_uses) > 1:
            out.extend(
                Instance(f"{declared.name}[{i}]", declared.name, u.group, u.index) for i, u in enumerate(reader_uses)
            )
        else:
            out.append(Instance(declared.name, declared.name, None, None))
    return out


def _first_model_reader(name: str, readers: dict[str, set[str]], model: list[Instance]) -> list[Instance]:
    """The instances of the first model level that reads `name`, directly or through other levels."""
    frontier, seen = [name], {name}
    while frontier:
        reader_names = {r for n in frontier for r in readers.get(n, ())} - seen
        in_model = [i for i in model if i.level in reader_names]
        if in_model:
            first = in_model[0].level
            return [i for i in model if i.level == first]
        seen |= reader_names
        frontier = sorted(reader_names)
    return []

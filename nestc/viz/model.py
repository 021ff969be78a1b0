"""What `nestc viz` draws, computed from the IR alone: level instances with their place on the frequency
axis and in the speed order ≻ (DESIGN §3 rule 1), ownership (rule 2), and the gradient-flow graph
(inner gradients, outer gradients through inner updates, generated quantities).

Nothing here knows a shipped spec: every box and every edge comes from `ir.System`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from ..checks.rules import _is_read_only, default_owner
from ..diagnostics import Span
from ..ir import models as ir
from ..ir.instances import Instance, instances
from ..show import level_table

# Edge kinds. `owns`: nesting (hierarchy view). The gradient view: `inner` (a level's objective updates its
# own memory), `outer` (the outer loss reaches a parameter through the level's inner updates, in the level's
# gradient mode; `read` for query projections, which get it directly), `generated` (a read of a level
# produces another's keys, values, targets or rates, labelled with the state it is read at).
EDGE_KINDS = ("owns", "inner", "outer", "generated")


@dataclass(frozen=True)
class Card:
    """One level instance, as drawn."""

    name: str
    level: str
    group: str | None
    index: int | None
    owner: str | None  # the owning instance (rule 2), None for an outermost optimizer
    band: int  # index of its frequency in `VizModel.bands` (0 = fastest)
    rank: int  # position of its level in ≻ (0 = fastest)
    memory: str
    objective: str
    optimizer: str
    frequency: str
    read: str
    gradient: str
    params: int
    kind: str  # matrix, mlp, kv, persistent, optimizer
    span: Span
    in_model: bool  # used as a layer of the model (not only through other levels)
    warned: tuple[str, ...] = ()  # W001: inputs whose projections get no gradient


@dataclass(frozen=True)
class Param:
    """A parameter group of the gradient view, trained by `trainer`'s optimizer."""

    id: str  # node id: `M_k[0]:init`, `memory[1]:keys`, `pretrain:layers`
    instance: str  # the instance it parameterises (the trainer itself for model layers)
    trainer: str  # the instance whose optimizer trains it
    role: str  # init, tokens, layers, queries, keys, values, targets, lr, retain, momentum
    label: str
    no_gradient: bool = False  # W001


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: str  # one of EDGE_KINDS
    mode: str  # outer: through / truncate k / stop / read; generated: online / before / boundary
    label: str
    role: str = ""


@dataclass
class VizModel:
    system: str
    cards: list[Card]
    bands: list[str]  # frequency descriptions, fastest first
    order: list[str]  # level names in ≻ (fastest first)
    params: list[Param]
    edges: list[Edge]
    layers: list[str] = field(default_factory=list)

    def card(self, name: str) -> Card:
        return next(c for c in self.cards if c.name == name)

    def trainers(self) -> list[str]:
        """Instances whose optimizer trains some parameter, outermost first."""
        out: list[str] = []
        for p in self.params:
            if p.trainer not in out:
                out.append(p.trainer)
        return out


def speed_order(system: ir.System) -> list[str]:
    """Level names in ≻ (DESIGN §3 rule 1): higher frequency first; on equal frequency, a level whose
    `online` state another reads at the same t comes first; then declaration order."""
    declared = {lv.name: i for i, lv in enumerate(system.levels)}
    key = {lv.name: (*lv.update.order_key(), declared[lv.name]) for lv in system.levels}
    graph = nx.DiGraph()
    graph.add_nodes_from(declared)
    for level in system.levels:
        for expr in level.inputs().values():
            for read in ir.expr_reads(expr):
                producer = system.level(read.level)
                if read.mode == "online" and read.level != level.name and producer.update == level.update:
                    graph.add_edge(read.level, level.name)
    try:
        return list(nx.lexicographical_topological_sort(graph, key=lambda n: key[n]))
    except nx.NetworkXUnfeasible:  # a cycle is an error `nestc check` reports; draw in frequency order
        return sorted(declared, key=lambda n: key[n])


def match_instance(level: str, like: Instance, insts: list[Instance]) -> Instance | None:
    """The instance of `level` that belongs with `like`: the only one, or the one in the same repeated
    block (same group and index), or the same index, or the first."""
    candidates = [i for i in insts if i.level == level]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    for test in (
        lambda i: i.group == like.group and i.index == like.index,
        lambda i: i.index == like.index,
    ):
        found = [i for i in candidates if test(i)]
        if found:
            return found[0]
    return candidates[0]


def warned_inputs(level: ir.Level) -> list[str]:
    """The inputs whose projections `nestc check` warns get no gradient (W001), exactly as the rule does."""
    if level.gradient.mode != "stop" or level.inner is None:
        return []
    roles: dict[str, ir.Expr] = {str(k): v for k, v in level.roles.items()}
    fed: list[str] = [r for r in ("keys", "values", "targets") if r in roles and not _is_read_only(roles[r])]
    fed += [name for name, rate in level.rates().items() if not ir.is_constant(rate.expr)]
    return fed


def _model_levels(node: ir.Node) -> set[str]:
    if isinstance(node, ir.LevelNode):
        return {node.level}
    if isinstance(node, (ir.SeqNode, ir.ParallelNode)):
        return set().union(*(_model_levels(i) for i in node.items)) if node.items else set()
    if isinstance(node, (ir.RepeatNode, ir.ResidualNode)):
        return _model_levels(node.body)
    if isinstance(node, ir.GateNode):
        return _model_levels(node.value) | _model_levels(node.gate)
    if isinstance(node, ir.PrefixNode):
        return _model_levels(node.attention) | _model_levels(node.memory)
    return set()


def _layer_kinds(node: ir.Node) -> list[str]:
    if isinstance(node, ir.LayerNode):
        return [node.kind]
    if isinstance(node, (ir.SeqNode, ir.ParallelNode)):
        return [k for i in node.items for k in _layer_kinds(i)]
    if isinstance(node, (ir.RepeatNode, ir.ResidualNode)):
        return _layer_kinds(node.body)
    if isinstance(node, ir.GateNode):
        return [*_layer_kinds(node.value), *_layer_kinds(node.gate), "gate"]
    if isinstance(node, ir.PrefixNode):
        return _layer_kinds(node.attention) + _layer_kinds(node.memory)
    return []


def _kind(level: ir.Level) -> str:
    return level.memory.kind if level.memory is not None else "optimizer"


def _gradient_label(level: ir.Level) -> str:
    mode = level.gradient
    return f"truncate {mode.k}" if mode.mode == "truncate" else mode.mode


def build(system: ir.System) -> VizModel:
    insts = instances(system)
    rows = {row["instance"]: row for row in level_table(system)}
    order = speed_order(system)
    rank = {name: i for i, name in enumerate(order)}
    freqs = sorted({lv.update for lv in system.levels}, key=lambda f: f.order_key())
    bands = [f.describe() for f in freqs]
    root = default_owner(system)
    in_model = _model_levels(system.model)

    def owner_of(inst: Instance) -> str | None:
        level = system.level(inst.level)
        owner = level.owner or (root.name if level.memory is not None and root is not None else None)
        if owner is None or owner == level.name:
            return None
        found = match_instance(owner, inst, insts)
        return found.name if found else None

    cards = []
    for inst in insts:
        level = system.level(inst.level)
        row = rows[inst.name]
        cards.append(
            Card(
                name=inst.name,
                level=level.name,
                group=inst.group,
                index=inst.index,
                owner=owner_of(inst),
                band=bands.index(level.update.describe()),
                rank=rank[level.name],
                memory=str(row["memory"]),
                objective=str(row["objective"]),
                optimizer=str(row["optimizer"]),
                frequency=str(row["frequency"]),
                read=str(row["read"]),
                gradient=str(row["gradient"]),
                params=int(row["params"]),
                kind=_kind(level),
                span=level.span,
                in_model=level.name in in_model,
                warned=tuple(warned_inputs(level)),
            )
        )

    params: list[Param] = []
    edges: list[Edge] = []
    layer_kinds = sorted(set(_layer_kinds(system.model)))
    for card in cards:
        if card.owner is not None:
            edges.append(Edge(card.owner, card.name, "owns", "", "owns"))
        level = system.level(card.level)
        if level.memory is None and card.owner is None:  # an outermost optimizer: the model's own layers
            if root is not None and level.name == root.name:
                label = "layers: " + ", ".join(layer_kinds)
            else:
                label = "params " + ", ".join(level.selectors or ["all"])
            params.append(Param(f"{card.name}:layers", card.name, card.name, "layers", label))
        if level.memory is None:
            continue
        inst = next(i for i in insts if i.name == card.name)
        trainer = card.owner or card.name
        mode = _gradient_label(level)
        if level.objective is not None:
            what = "task loss over its chunk" if level.objective.kind == "task" else f"loss {level.objective.kind}"
            edges.append(Edge(f"{card.name}:objective", card.name, "inner", "inner", what))
        # Parameters of this instance, and how the outer loss reaches them.
        if level.memory.kind in ("mlp", "persistent"):
            role = "tokens" if level.memory.kind == "persistent" else "init"
            label = f"{level.memory.tokens} tokens" if role == "tokens" else "θ₋₁ initial state"
            params.append(Param(f"{card.name}:{role}", card.name, trainer, role, label))
            edges.append(Edge(card.name, f"{card.name}:{role}", "outer", mode, mode, role))
        warned = set(card.warned)
        for name, expr in level.inputs().items():
            if _is_read_only(expr) and name not in warned:
                continue
            no_grad = name in warned
            params.append(Param(f"{card.name}:{name}", card.name, trainer, name, f"W_{name}", no_grad))
            edge_mode = "read" if name == "queries" else mode
            label = "no gradient (W001)" if no_grad else edge_mode
            edges.append(Edge(card.name, f"{card.name}:{name}", "outer", edge_mode, label, name))
        # Generated quantities: reads of levels (itself included) inside this level's expressions.
        seen: set[tuple[str, str, str]] = set()
        for name, expr in level.inputs().items():
            for read in ir.expr_reads(expr):
                producer = match_instance(read.level, inst, insts)
                if producer is None or (producer.name, name, read.mode) in seen:
                    continue
                seen.add((producer.name, name, read.mode))
                edges.append(Edge(producer.name, card.name, "generated", read.mode, f"{name} · {read.mode}", name))
        if level.memory.persistent:
            producer = match_instance(level.memory.persistent, inst, insts)
            if producer is not None:
                prefix_mode = system.level(producer.level).read.mode
                edges.append(
                    Edge(producer.name, card.name, "generated", prefix_mode, f"prefix · {prefix_mode}", "prefix")
                )
    return VizModel(system.name, cards, bands, order, params, edges, layer_kinds)

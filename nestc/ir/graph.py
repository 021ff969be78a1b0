"""networkx views of a system: the level graph and the per-token evaluation graph (DESIGN §3 rule 1).

Evaluation-graph nodes are tuples: ("update", level) or ("read", level, mode, site), where `site` says
where the read happens (the level's use as a layer, or "<consumer>.<role>" inside another expression).
An edge u -> v means u must be computed before v at the same token.
"""

from __future__ import annotations

import networkx as nx

from . import models as ir

Site = tuple[str, ...]


def site_label(node: Site) -> str:
    if node[0] == "update":
        return f"update of `{node[1]}`"
    _, level, mode, site = node
    return f"`{level}` read {mode} ({site})"


def evaluation_graph(system: ir.System) -> nx.DiGraph:
    graph = nx.DiGraph()
    for level in system.levels:
        if not level.in_context:
            continue
        update: Site = ("update", level.name)
        graph.add_node(update)
        use: Site = ("read", level.name, level.read.mode, "its output")
        _add_read(graph, use)
        for role, expr in level.inputs().items():
            consumer = use if role == "queries" else update
            for read in ir.expr_reads(expr):
                site: Site = ("read", read.level, read.mode, f"{level.name}.{role}")
                _add_read(graph, site)
                graph.add_edge(site, consumer)
    return graph


def _add_read(graph: nx.DiGraph, site: Site) -> None:
    graph.add_node(site)
    if site[2] == "online":  # θ_t exists only after the update at t
        graph.add_edge(("update", site[1]), site)


def level_graph(system: ir.System) -> nx.DiGraph:
    """Levels as nodes; `nesting` edges owner -> nested, `data` edges producer -> consumer."""
    graph = nx.DiGraph()
    for level in system.levels:
        graph.add_node(level.name, frequency=level.update.describe(), in_context=level.in_context)
    for level in system.levels:
        if level.owner:
            graph.add_edge(level.owner, level.name, kind="nesting")
        for expr in [*level.roles.values(), *(r.expr for r in level.rates().values())]:
            for read in ir.expr_reads(expr):
                graph.add_edge(read.level, level.name, kind="data", mode=read.mode)
    return graph

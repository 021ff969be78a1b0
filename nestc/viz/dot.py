"""Graphviz DOT and Mermaid texts of the same model: every level instance and every edge of the IR.

Node ids: `h/NAME` in the hierarchy, `g/NAME` (memory state), `g/NAME:objective`, `g/NAME:ROLE`
(a parameter) in the gradient view. Every edge carries `class` = its kind (owns, inner, outer, generated).
"""

from __future__ import annotations

import re

from .model import VizModel
from .scene import KIND_FILL, KIND_STROKE, MODE_STYLE, READ_COLOUR

DOT_STYLE = {"through": "solid", "truncate": "dashed", "stop": "dotted", "read": "solid"}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _card_label(model: VizModel, name: str) -> str:
    c = model.card(name)
    return f"{c.name}\\n{c.memory}\\nobjective {c.objective} · {c.optimizer}\\n{c.frequency}"


def to_dot(model: VizModel, view: str = "both") -> str:
    lines = [f"digraph {_q(model.system)} {{", '  graph [fontname="DejaVu Sans Mono", compound=true];']
    lines.append('  node [shape=box, style="rounded,filled", fontname="DejaVu Sans Mono", fontsize=10];')
    lines.append('  edge [fontname="DejaVu Sans Mono", fontsize=9];')
    if view in ("hierarchy", "both"):
        lines += _dot_hierarchy(model)
    if view in ("gradients", "both"):
        lines += _dot_gradients(model)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_hierarchy(model: VizModel) -> list[str]:
    out = ['  subgraph "cluster_hierarchy" {', '    label="level hierarchy (fast to slow)"; rankdir=TB;']
    children: dict[str | None, list[str]] = {}
    for c in model.cards:
        children.setdefault(c.owner, []).append(c.name)

    def node(name: str, indent: str) -> None:
        c = model.card(name)
        out.append(
            f"{indent}{_q('h/' + name)} [label={_q(_card_label(model, name))}, fillcolor={_q(KIND_FILL[c.kind])}, "
            f"color={_q(KIND_STROKE[c.kind])}, frequency={_q(c.frequency)}, rank_order={c.rank + 1}];"
        )

    def cluster(name: str, indent: str) -> None:
        kids = children.get(name, [])
        if not kids:
            node(name, indent)
            return
        out.append(f"{indent}subgraph {_q('cluster_h/' + name)} {{ label={_q(name + ' trains')}; style=rounded;")
        node(name, indent + "  ")
        groups: dict[tuple[str, int], list[str]] = {}
        for kid in kids:
            c = model.card(kid)
            if c.group is None:
                cluster(kid, indent + "  ")
            else:
                groups.setdefault((c.group, c.index or 0), []).append(kid)
        for (group, index), members in sorted(groups.items()):
            out.append(
                f"{indent}  subgraph {_q(f'cluster_h/{name}/{group}[{index}]')} "
                f"{{ label={_q(f'{group}[{index}]')}; style=dashed;"
            )
            for kid in members:
                cluster(kid, indent + "    ")
            out.append(f"{indent}  }}")
        out.append(f"{indent}}}")

    for root in children.get(None, []):
        cluster(root, "    ")
    for e in model.edges:
        if e.kind == "owns":
            out.append(
                f"    {_q('h/' + e.src)} -> {_q('h/' + e.dst)} "
                "[class=owns, label=owns, style=dotted, arrowhead=odiamond];"
            )
    out.append("  }")
    return out


def _dot_gradients(model: VizModel) -> list[str]:
    out = ['  subgraph "cluster_gradients" {', '    label="gradient flow";']
    for trainer in model.trainers():
        out.append(
            f"    subgraph {_q('cluster_g/' + trainer)} {{ label={_q('parameters of ' + trainer)}; style=rounded;"
        )
        for p in model.params:
            if p.trainer == trainer:
                colour = "#c62828" if p.no_gradient else "#6d5a7b"
                label = ("⚠ " if p.no_gradient else "") + f"{p.instance} {p.label}"
                extra = ", no_gradient=true" if p.no_gradient else ""
                out.append(
                    f"      {_q('g/' + p.id)} [label={_q(label)}, shape=note, fillcolor=white, "
                    f"color={_q(colour)}{extra}];"
                )
        out.append("    }")
    for c in model.cards:
        if c.kind == "optimizer":
            continue
        label = f"θ {c.name}\\n{c.kind} · {c.frequency}"
        out.append(f"    {_q('g/' + c.name)} [label={_q(label)}, fillcolor={_q(KIND_FILL[c.kind])}];")
    for e in model.edges:
        if e.kind == "inner":
            out.append(f'    {_q("g/" + e.src)} [label={_q(e.label)}, shape=ellipse, fillcolor="#fff4e8"];')
            out.append(
                f'    {_q("g/" + e.src)} -> {_q("g/" + e.dst)} [class=inner, label="inner gradient", color="#e67e22"];'
            )
        elif e.kind == "outer":
            colour = MODE_STYLE[e.mode.split()[0]][0]
            out.append(
                f"    {_q('g/' + e.src)} -> {_q('g/' + e.dst)} [class=outer, mode={_q(e.mode)}, label={_q(e.label)}, "
                f"style={DOT_STYLE[e.mode.split()[0]]}, color={_q(colour)}];"
            )
        elif e.kind == "generated":
            out.append(
                f"    {_q('g/' + e.src)} -> {_q('g/' + e.dst)} [class=generated, mode={_q(e.mode)}, "
                f"label={_q(e.label)}, color={_q(READ_COLOUR.get(e.mode, '#555555'))}];"
            )
    out.append("  }")
    return out


def mermaid_id(node: str) -> str:
    """A Mermaid-safe id for a node id (`g/M_k[0]:init` -> `g_M_k_0__init`)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", node)


def _m(text: str) -> str:
    return '"' + text.replace('"', "#quot;") + '"'


def to_mermaid(model: VizModel, view: str = "both") -> str:
    lines = ["flowchart TB"]
    arrows = {"owns": "-.->", "inner": "==>", "generated": "-->"}
    styles = {"through": "-->", "truncate": "-.->", "stop": "-.->", "read": "-->"}
    link = 0
    link_styles: list[str] = []
    if view in ("hierarchy", "both"):
        lines.append('  subgraph hierarchy["level hierarchy (fast to slow)"]')
        for c in model.cards:
            label = f"{c.name}<br/>{c.memory}<br/>objective {c.objective} · {c.optimizer}<br/>{c.frequency}"
            lines.append(f"    {mermaid_id('h/' + c.name)}[{_m(label)}]")
        for e in model.edges:
            if e.kind == "owns":
                lines.append(f"    {mermaid_id('h/' + e.src)} {arrows['owns']}|owns| {mermaid_id('h/' + e.dst)}")
                link += 1
        lines.append("  end")
    if view in ("gradients", "both"):
        lines.append('  subgraph gradients["gradient flow"]')
        for trainer in model.trainers():
            lines.append(f"    subgraph {mermaid_id('g/' + trainer + '/params')}[{_m('parameters of ' + trainer)}]")
            for p in model.params:
                if p.trainer == trainer:
                    label = (
                        ("⚠ " if p.no_gradient else "")
                        + f"{p.instance} {p.label}"
                        + (" (W001)" if p.no_gradient else "")
                    )
                    lines.append(f"      {mermaid_id('g/' + p.id)}[{_m(label)}]")
            lines.append("    end")
        for c in model.cards:
            if c.kind != "optimizer":
                lines.append(f"    {mermaid_id('g/' + c.name)}[{_m('θ ' + c.name + '<br/>' + c.frequency)}]")
        for e in model.edges:
            src, dst = mermaid_id("g/" + e.src), mermaid_id("g/" + e.dst)
            if e.kind == "inner":
                lines.append(f"    {src}([{_m(e.label)}]) {arrows['inner']}|inner gradient| {dst}")
            elif e.kind == "outer":
                lines.append(f"    {src} {styles[e.mode.split()[0]]}|{_m(e.label)}| {dst}")
                colour = "#c62828" if "W001" in e.label else MODE_STYLE[e.mode.split()[0]][0]
                dash = ",stroke-dasharray:2 3" if e.mode == "stop" else ""
                link_styles.append(f"  linkStyle {link} stroke:{colour}{dash}")
            elif e.kind == "generated":
                lines.append(f"    {src} {arrows['generated']}|{_m(e.label)}| {dst}")
            else:
                continue
            link += 1
        lines.append("  end")
    return "\n".join(lines + link_styles) + "\n"

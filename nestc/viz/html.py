"""The HTML report: both pictures inline (level cards link to their source lines), the level table of
`nestc show` with repeated blocks grouped in expandable <details>, and the spec source in colour."""

from __future__ import annotations

from html import escape
from typing import Any

from ..diagnostics import Source, SourceMap, Span
from ..ir import models as ir
from ..show import COLUMNS, level_table
from .highlight import highlight_lines
from .model import VizModel
from .scene import Group, build_scene
from .svg import to_svg

CSS = """
body { font-family: "DejaVu Sans", system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
nav a { margin-right: 14px; }
.figure { overflow-x: auto; border: 1px solid #e3e6ea; border-radius: 6px; padding: 6px; }
.figure svg a:hover rect { stroke-width: 3; }
table { border-collapse: collapse; font: 12px "DejaVu Sans Mono", monospace; margin: 6px 0; }
th, td { border: 1px solid #dde; padding: 3px 8px; text-align: left; } th { background: #f3f4f7; }
td.num { text-align: right; }
details { margin: 6px 0 6px 8px; } summary { cursor: pointer; font-weight: bold; }
details.group { border-left: 3px solid #6b7785; padding-left: 8px; }
pre.src { font: 12.5px/1.45 "DejaVu Sans Mono", monospace; background: #fbfbfd; border: 1px solid #e3e6ea;
  padding: 8px 0; overflow-x: auto; }
pre.src .line { display: block; padding: 0 10px; } pre.src .line:target { background: #fff3bf; }
pre.src a.ln { display: inline-block; width: 3.2em; color: #9aa; text-decoration: none; user-select: none; }
.c { color: #6a7f6a; font-style: italic; } .k { color: #7b2c9d; font-weight: bold; } .n { color: #b35c00; }
.s { color: #1a7f37; } .lv { color: #0b5cad; font-weight: bold; } .f { color: #005f73; } .p { color: #666; }
.o { color: #a61b29; }
"""

SCRIPT = """
function setAll(open) { document.querySelectorAll('details').forEach(d => { d.open = open; }); }
"""


class Anchors:
    """One anchor per source line: `L12` in the spec itself, `F1-L12` in its first imported file, ..."""

    def __init__(self, main: Source, sources: SourceMap) -> None:
        self.files = [main] + [s for path, s in sources.files.items() if path != main.path]
        self.prefix = {s.path: ("" if i == 0 else f"F{i}-") for i, s in enumerate(self.files)}

    def of(self, span: Span) -> str | None:
        source = next((s for s in self.files if s.path == span.file), None)
        if source is None:
            return None
        line, _ = source.line_col(span.start)
        return f"{self.prefix[source.path]}L{line}"


def report(model: VizModel, system: ir.System, main: Source, sources: SourceMap, view: str = "both") -> str:
    anchors = Anchors(main, sources)
    links = {c.name: anchors.of(c.span) for c in model.cards}

    def href(group: Group) -> str | None:
        name = group.data.get("instance")
        anchor = links.get(name) if group.cls == "level" and name else None
        return f"#{anchor}" if anchor else None

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>nestc: {escape(model.system)}</title><style>{CSS}</style><script>{SCRIPT}</script></head><body>",
        f"<h1>system {escape(model.system)}</h1>",
        f"<p>{escape(main.path)} · {len(model.cards)} level instances · speed order ≻ (fastest first): "
        + " ≻ ".join(f"<code>{escape(n)}</code>" for n in model.order)
        + "</p>",
        '<nav><a href="#hierarchy">hierarchy</a><a href="#gradients">gradient flow</a>'
        '<a href="#levels">level table</a><a href="#source">source</a></nav>',
    ]
    for name, title in (("hierarchy", "Level hierarchy"), ("gradients", "Gradient flow")):
        if view in (name, "both"):
            svg = to_svg(build_scene(model, name), href=href, standalone=False)
            parts.append(f'<h2 id="{name}">{title}</h2><div class="figure">{svg}</div>')
    parts.append('<h2 id="levels">Level instances</h2>')
    parts.append(
        '<p><button type="button" onclick="setAll(true)">expand all</button> '
        '<button type="button" onclick="setAll(false)">collapse all</button></p>'
    )
    index_of = {c.name: c.index or 0 for c in model.cards}
    parts.append(_table_html(level_table(system), links, index_of))
    parts.append('<h2 id="source">Source</h2>')
    for source in anchors.files:
        prefix = anchors.prefix[source.path]
        parts.append(f'<h3>{escape(source.path)}</h3><pre class="src">')
        for n, line in enumerate(highlight_lines(source.text), start=1):
            anchor = f"{prefix}L{n}"
            parts.append(f'<span class="line" id="{anchor}"><a class="ln" href="#{anchor}">{n}</a>{line}</span>')
        parts.append("</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _rows_html(rows: list[dict[str, Any]], links: dict[str, str | None]) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = []
    for row in rows:
        cells = []
        for c in COLUMNS:
            value = row[c]
            if c == "params":
                cells.append(f'<td class="num">{value:,}</td>')
            elif c == "instance" and links.get(value):
                cells.append(f'<td><a href="#{links[value]}">{escape(str(value))}</a></td>')
            else:
                cells.append(f"<td>{escape(str(value))}</td>")
        body.append(f'<tr data-instance="{escape(str(row["instance"]))}">' + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>" + "".join(body) + "</table>"


def _table_html(rows: list[dict[str, Any]], links: dict[str, str | None], index_of: dict[str, int]) -> str:
    """The level table; the instances of each repeated block inside <details> (the first one open)."""
    plain = [r for r in rows if r["group"] is None]
    groups: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        if row["group"] is not None:
            group = str(row["group"])
            groups.setdefault(group, {}).setdefault(index_of.get(str(row["instance"]), 0), []).append(row)
    out = [_rows_html(plain, links)] if plain else []
    for group, by_index in groups.items():
        out.append(
            f'<details class="group" data-group="{escape(group)}" open><summary>{escape(group)} × {len(by_index)} '
            f"(repeated block, {sum(len(v) for v in by_index.values())} instances)</summary>"
        )
        for index, members in sorted(by_index.items()):
            opened = " open" if index == 0 else ""
            names = ", ".join(escape(str(r["instance"])) for r in members)
            out.append(
                f'<details class="block" data-group="{escape(group)}" data-index="{index}"{opened}>'
                f"<summary>{escape(group)}[{index}]: {names}</summary>{_rows_html(members, links)}</details>"
            )
        out.append("</details>")
    return "\n".join(out)

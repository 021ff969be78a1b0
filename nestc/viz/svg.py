"""A `Scene` as SVG text (written by hand: no system binary, no library)."""

from __future__ import annotations

from collections.abc import Callable
from xml.sax.saxutils import escape, quoteattr

from .scene import FONT, Dot, Group, Path, Rect, Scene, Shape, Text

ANCHOR = {"start": "start", "middle": "middle", "end": "end"}


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _shape(shape: Shape, out: list[str], markers: dict[str, str]) -> None:
    if isinstance(shape, Rect):
        dash = f' stroke-dasharray="{shape.dash}"' if shape.dash else ""
        out.append(
            f'<rect x="{_num(shape.x)}" y="{_num(shape.y)}" width="{_num(shape.w)}" height="{_num(shape.h)}" '
            f'rx="{_num(shape.rx)}" fill="{shape.fill}" stroke="{shape.stroke}" '
            f'stroke-width="{_num(shape.width)}"{dash}/>'
        )
    elif isinstance(shape, Text):
        weight = ' font-weight="bold"' if shape.weight == "bold" else ""
        out.append(
            f'<text x="{_num(shape.x)}" y="{_num(shape.y)}" font-size="{_num(shape.size)}" fill="{shape.color}" '
            f'text-anchor="{ANCHOR[shape.anchor]}"{weight}>{escape(shape.text)}</text>'
        )
    elif isinstance(shape, Path):
        d = " ".join(f"{'M' if i == 0 else 'L'}{_num(x)},{_num(y)}" for i, (x, y) in enumerate(shape.points))
        dash = f' stroke-dasharray="{shape.dash}"' if shape.dash else ""
        marker = ""
        if shape.arrow:
            mid = markers.setdefault(shape.stroke, f"arrow{len(markers)}")
            marker = f' marker-end="url(#{mid})"'
        out.append(
            f'<path d="{d}" fill="none" stroke="{shape.stroke}" stroke-width="{_num(shape.width)}"{dash}{marker}/>'
        )
    elif isinstance(shape, Dot):
        out.append(f'<circle cx="{_num(shape.x)}" cy="{_num(shape.y)}" r="{_num(shape.r)}" fill="{shape.fill}"/>')


def _group(group: Group, out: list[str], markers: dict[str, str], href: Callable[[Group], str | None]) -> None:
    attrs = f' class="{group.cls}"' + "".join(f" data-{k}={quoteattr(v)}" for k, v in group.data.items())
    link = href(group)
    if link:
        out.append(f"<a href={quoteattr(link)}>")
    out.append(f"<g{attrs}>")
    if group.title:
        out.append(f"<title>{escape(group.title)}</title>")
    for item in group.shapes:
        if isinstance(item, Group):
            _group(item, out, markers, href)
        else:
            _shape(item, out, markers)
    out.append("</g>")
    if link:
        out.append("</a>")


def to_svg(scene: Scene, href: Callable[[Group], str | None] | None = None, standalone: bool = True) -> str:
    """SVG text; `href(group)` links a group (the HTML report links level cards to their source lines)."""
    markers: dict[str, str] = {}
    body: list[str] = []
    _group(scene.root, body, markers, href or (lambda g: None))
    defs = "".join(
        f'<marker id="{mid}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>'
        for colour, mid in markers.items()
    )
    w, h = _num(scene.width), _num(scene.height)
    head = '<?xml version="1.0" encoding="UTF-8"?>\n' if standalone else ""
    return (
        f'{head}<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'font-family="{FONT}, Menlo, Consolas, monospace">\n'
        f'<defs>{defs}</defs>\n<rect width="100%" height="100%" fill="#ffffff"/>\n' + "\n".join(body) + "\n</svg>\n"
    )

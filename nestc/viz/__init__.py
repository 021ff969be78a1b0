"""`nestc viz`: pictures of a system computed from its IR — the level hierarchy on the frequency axis and
the gradient flow — as SVG, PNG, Graphviz DOT, Mermaid or an HTML report."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..pipeline import Compilation
from .dot import mermaid_id, to_dot, to_mermaid
from .html import report
from .model import VizModel, build, match_instance, speed_order
from .png import to_png
from .scene import build_scene
from .svg import to_svg

FORMATS = {".svg": "svg", ".png": "png", ".dot": "dot", ".gv": "dot", ".mmd": "mermaid", ".html": "html"}
VIEWS = ("hierarchy", "gradients", "both")

__all__ = [
    "FORMATS",
    "VIEWS",
    "VizModel",
    "build",
    "match_instance",
    "mermaid_id",
    "render",
    "speed_order",
    "to_dot",
    "to_mermaid",
    "to_png",
    "to_svg",
    "write",
]


def format_of(path: str | Path) -> str | None:
    return FORMATS.get(Path(path).suffix.lower())


def render(compilation: Compilation, fmt: str, view: str = "both") -> bytes:
    """The picture of a compiled spec in one format, as bytes."""
    model = build(compilation.system)
    if fmt == "svg":
        return to_svg(build_scene(model, view)).encode()
    if fmt == "png":
        return to_png(build_scene(model, view))
    if fmt == "dot":
        return to_dot(model, view).encode()
    if fmt == "mermaid":
        return to_mermaid(model, view).encode()
    if fmt == "html":
        return report(model, compilation.system, compilation.source, compilation.sources, view).encode()
    raise ValueError(f"unknown picture format {fmt!r}")


def write(compilation: Compilation, out: str | Path, view: str = "both") -> str:
    """Render into `out` atomically (a temporary file in the same folder, then a rename); returns the format."""
    fmt = format_of(out)
    if fmt is None:
        raise ValueError(f"{out}: unknown extension")
    data = render(compilation, fmt, view)
    path = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fmt

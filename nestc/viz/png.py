"""A `Scene` as PNG through matplotlib (a pip dependency; no system binary)."""

from __future__ import annotations

import io

from .scene import FONT, Dot, Path, Rect, Scene, Text, walk_shapes

DPI = 100


def _dashes(dash: str | None) -> tuple[float, tuple[float, ...]] | str:
    if not dash:
        return "solid"
    return (0.0, tuple(float(v) for v in dash.split(",")))


def to_png(scene: Scene, scale: float = 1.5) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as MplPath

    dpi = DPI * scale
    fig = plt.figure(figsize=(scene.width / DPI, scene.height / DPI), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, scene.width)
    ax.set_ylim(scene.height, 0)
    ax.axis("off")
    pt = 72.0 / DPI  # pixels to points
    for shape in walk_shapes(scene.root):
        if isinstance(shape, Rect):
            ax.add_patch(
                FancyBboxPatch(
                    (shape.x, shape.y),
                    shape.w,
                    shape.h,
                    boxstyle=f"round,pad=0,rounding_size={shape.rx}",
                    facecolor=shape.fill,
                    edgecolor=shape.stroke,
                    linewidth=shape.width * pt,
                    linestyle=_dashes(shape.dash),
                )
            )
        elif isinstance(shape, Text):
            ax.text(
                shape.x,
                shape.y,
                shape.text,
                fontsize=shape.size * pt,
                color=shape.color,
                fontweight=shape.weight,
                ha={"start": "left", "middle": "center", "end": "right"}[shape.anchor],
                va="baseline",
                family=FONT,
            )
        elif isinstance(shape, Path):
            codes = [MplPath.MOVETO] + [MplPath.LINETO] * (len(shape.points) - 1)
            ax.add_patch(
                FancyArrowPatch(
                    path=MplPath(shape.points, codes),
                    arrowstyle="-|>,head_length=5,head_width=2.5" if shape.arrow else "-",
                    color=shape.stroke,
                    linewidth=shape.width * pt,
                    linestyle=_dashes(shape.dash),
                    shrinkA=0,
                    shrinkB=0,
                )
            )
        elif isinstance(shape, Dot):
            ax.add_patch(Circle((shape.x, shape.y), shape.r, color=shape.fill))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)
    return buffer.getvalue()

"""Write a compiled system's kernels: one file per key (named by its digest) and one line map per level.

`DIR/kernels/<digest>.py` is what the runtime imports; `DIR/kernels/<level>.map.json` maps line ranges
of the generated source to the `.nest` statements (file:line:col) they implement. The source is a
function of the key alone (so levels with equal keys share a file); the spans live in the map.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nestc_runtime.kernels.key import MLPKernelKey, block_for_chunk, fits_sm90
from nestc_runtime.ops.matrix_memory.state import MatrixMemoryConfig
from nestc_runtime.ops.matrix_memory.triton import kernel_key
from nestc_runtime.plan import LevelPlan, Plan

from ..diagnostics import Source, Span
from ..ir import models as ir
from .render import GeneratedKernel, render_matrix, render_mlp

DTYPES = (torch.float32, torch.bfloat16)


def level_keys(level: LevelPlan) -> list[GeneratedKernel]:
    """The kernels a level runs on a GPU (one per dtype), or none when no kernel covers its combination."""
    if level.kind == "mlp":
        return _mlp_keys(level)
    if level.kind != "matrix" or (level.objective or "l2") not in ("dot", "l2"):
        return []
    if (level.optimizer or "gd") not in ("gd", "dgd", "momentum_gd") or block_for_chunk(level.chunk) is None:
        return []
    if any(rate.shape == "channel" for rate in level.rates.values()) or level.gradient == "truncate":
        return []
    try:
        cfg = MatrixMemoryConfig(
            objective=level.objective or "l2",
            decay=level.decay,
            chunk=level.chunk,
            read=level.read,
            optimizer=level.optimizer or "gd",
        )
        keys = [kernel_key(cfg, level.d_key, level.d_value, dtype) for dtype in DTYPES]
        return [render_matrix(key) for key in keys if fits_sm90(key)]
    except ValueError:  # head dims or a combination without a kernel
        return []


def _mlp_keys(level: LevelPlan) -> list[GeneratedKernel]:
    """A 2-layer SiLU MLP memory under `gd` with a per-head retention, every 16/32/64 tokens."""
    options = level.options
    plain = options.get("activation", "silu") == "silu" and options.get("depth", 2) == 2
    if not plain or (level.objective or "l2") not in ("dot", "l2") or (level.optimizer or "gd") != "gd":
        return []
    if any(rate.shape == "channel" for rate in level.rates.values()) or level.gradient != "through":
        return []
    try:
        hidden = int(options.get("expand", 4) * level.d_key)
        norm = options.get("norm") == "layernorm"
        keys = [MLPKernelKey(level.objective or "l2", level.read, level.chunk, level.d_key, hidden, norm, dtype)
                for dtype in ("fp32", "bf16")]  # fmt: skip
    except ValueError:  # sizes or a chunk without a kernel
        return []
    return [render_mlp(key) for key in keys if fits_sm90(key)]


def _where(span: Span, source: Source) -> str:
    line, col = source.line_col(span.start)
    return f"{span.file}:{line}:{col}"


def line_map(kernel: GeneratedKernel, level: ir.Level, source: Source) -> list[dict[str, object]]:
    """Each generated section with the span of the statement it implements (the level's span when the
    statement is left to its default)."""
    out: list[dict[str, object]] = []
    for section in kernel.sections:
        span = level.spans.get(section.statement, level.span)
        at = _where(span, source) if span.file == source.path else span.file
        out.append({"lines": [section.first, section.last], "statement": section.statement, "nest": at})
    return out


def write_level_kernels(plan: Plan, system: ir.System, source: Source, directory: Path) -> list[str]:
    """Write every level's kernels and line maps under `directory/kernels`; returns the files written."""
    by_name = {level.name: level for level in system.levels}
    written: list[str] = []
    folder = directory / "kernels"
    for name, level_plan in sorted(plan.levels.items()):
        kernels = level_keys(level_plan)
        if not kernels or name not in by_name:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        maps = []
        for kernel in kernels:
            _write(folder / kernel.file_name, kernel.source)
            written.append(f"kernels/{kernel.file_name}")
            maps.append(
                {
                    "key": kernel.key.text(),
                    "file": kernel.file_name,
                    "sections": line_map(kernel, by_name[name], source),
                }
            )
        _write(folder / f"{name}.map.json", json.dumps({"level": name, "kernels": maps}, indent=2) + "\n")
        written.append(f"kernels/{name}.map.json")
    return written


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

"""The compiler's stages end to end: read, parse, elaborate, check, lower.

Each stage reports through diagnostics; a `CompileError` carries every error of the file and the sources
needed to render them, so `str(error)` is the same text `nestc check` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nestc_runtime.plan import Plan

from .checks.rules import check
from .diagnostics import CompileError, Diagnostic, Source, SourceMap, render
from .ir import models as ir
from .ir.elaborate import elaborate
from .language.parser import parse
from .lower.lower import lower

MAX_SPEC_BYTES = 1_000_000  # a spec is a small text file; refuse anything larger before parsing


class SpecFileError(Exception):
    """The spec file cannot be read (missing, a directory, too large, not UTF-8): a usage error."""


class SpecError(CompileError):
    """A CompileError that knows its sources, so it prints as rendered diagnostics."""

    def __init__(self, diagnostics: list[Diagnostic], sources: SourceMap) -> None:
        super().__init__(diagnostics)
        self.sources = sources

    def __str__(self) -> str:
        return "\n".join(render(d, self.sources) for d in self.diagnostics)


@dataclass
class Compilation:
    """Everything the front end produced for one spec."""

    path: str
    source: Source
    sources: SourceMap
    system: ir.System
    warnings: list[Diagnostic] = field(default_factory=list)


def read_source(path: str | Path) -> Source:
    p = Path(path)
    if not p.is_file():
        raise SpecFileError(f"{path}: no such spec file" if not p.exists() else f"{path}: is not a file")
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecFileError(f"{path}: a spec larger than {MAX_SPEC_BYTES} bytes is refused")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return Source(str(path), text)


def front_end(path: str | Path, params: Mapping[str, float] | None = None) -> Compilation:
    """Parse, elaborate and check a spec; raises SpecError with every error (and the warnings)."""
    source = read_source(path)
    sources = SourceMap()
    sources.add(source)
    try:
        system = elaborate(parse(source), params)
        bag = check(system)
        bag.raise_if_errors()
    except CompileError as exc:
        raise SpecError(exc.diagnostics, sources) from None
    return Compilation(str(path), source, sources, system, bag.warnings)


def to_plan(compilation: Compilation) -> Plan:
    try:
        return lower(compilation.system, compilation.source.text)
    except CompileError as exc:
        raise SpecError(exc.diagnostics, compilation.sources) from None

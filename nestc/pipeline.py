"""The compiler's stages end to end: read, parse, elaborate, check, lower.

Each stage reports through diagnostics; a `CompileError` carries every error of the file and the sources
needed to render them, so `str(error)` is the same text `nestc check` prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nestc_runtime.plan import Plan

from .checks.rules import check
from .diagnostics import CompileError, Diagnostic, DiagnosticBag, Source, SourceMap, Span, render
from .ir import models as ir
from .ir.elaborate import ParamValue, elaborate
from .language import ast
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


class _FragmentLoader:
    """Resolves `import "file.nest"` relative to the importing file; fragments may import fragments."""

    def __init__(self, root: Path, sources: SourceMap, bag: DiagnosticBag) -> None:
        self.sources = sources
        self.bag = bag
        self.stack: list[Path] = [root.resolve()]

    def __call__(self, written: str, span: Span) -> ast.System | None:
        try:
            path = (self.stack[-1].parent / written).resolve()
        except (OSError, ValueError):  # e.g. a NUL byte in the string: no file can have that name
            self.bag.error("E030", f"cannot import {written!r}: not a valid file name", span)
            return None
        if path.suffix != ".nest":  # never read (nor quote in a diagnostic) a file that is not a spec
            self.bag.error("E030", f"cannot import {written!r}: not a .nest file", span, "imports name .nest files")
            return None
        if path in self.stack:
            self.bag.error("E030", f'"{written}" imports itself (a cycle of imports)', span)
            return None
        try:
            source = read_source(_display_path(path))
        except SpecFileError as exc:
            self.bag.error(
                "E030",
                f'cannot import "{written}": {str(exc).split(": ", 1)[-1]}',
                span,
                "imports are resolved relative to the importing file",
            )
            return None
        self.sources.add(source)
        fragment = parse(source)
        self.stack.append(path)
        try:
            nested = [item for imp in fragment.imports if (f := self(imp.path, imp.span)) for item in f.items]
        finally:
            self.stack.pop()
        return dataclasses.replace(fragment, items=(*nested, *fragment.items))


def _display_path(path: Path) -> Path:
    """A path relative to the working directory when it lies under it (for readable diagnostics)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def front_end(
    path: str | Path, params: Mapping[str, ParamValue] | None = None, seq_len: int | None = None
) -> Compilation:
    """Parse, elaborate and check a spec; raises SpecError with every error (and the warnings)."""
    source = read_source(path)
    sources = SourceMap()
    sources.add(source)
    import_errors = DiagnosticBag()
    try:
        loader = _FragmentLoader(Path(path), sources, import_errors)
        system = elaborate(parse(source), params, loader)
        import_errors.raise_if_errors()
        bag = check(system, seq_len)
        bag.raise_if_errors()
    except CompileError as exc:
        raise SpecError(import_errors.items + exc.diagnostics, sources) from None
    return Compilation(str(path), source, sources, system, bag.warnings)


def to_plan(compilation: Compilation) -> Plan:
    try:
        return lower(compilation.system, compilation.source.text)
    except CompileError as exc:
        raise SpecError(exc.diagnostics, compilation.sources) from None

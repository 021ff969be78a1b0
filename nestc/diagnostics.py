"""Spans, diagnostics and their rendering.

Every AST and IR node keeps a `Span` (character offsets into one source file); line and column are derived
only when a diagnostic is printed. A `Diagnostic` is one error or warning with a stable code (see
`nestc explain`), a message, a primary span, optional secondary labels and a hint. Compiler stages collect
diagnostics in a `DiagnosticBag` and raise `CompileError` carrying all of them, so a run reports every
error of a file at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

Severity = Literal["error", "warning"]


class Span(BaseModel):
    """A half-open range [start, end) of character offsets in `file`."""

    model_config = ConfigDict(frozen=True)

    file: str
    start: int
    end: int

    def to(self, other: Span) -> Span:
        """The smallest span covering both."""
        return Span(file=self.file, start=min(self.start, other.start), end=max(self.end, other.end))


class Source:
    """The text of one spec file, with the line index needed to turn offsets into line:col."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self._line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based line and column of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        lo, hi = 0, len(self._line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._line_starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, offset - self._line_starts[lo] + 1

    def line_text(self, line: int) -> str:
        start = self._line_starts[line - 1]
        end = self.text.find("\n", start)
        return self.text[start : end if end >= 0 else len(self.text)]

    def span(self, start: int, end: int) -> Span:
        return Span(file=self.path, start=start, end=end)


@dataclass
class Label:
    """A secondary span with a short note (e.g. "the other level is declared here")."""

    span: Span
    note: str


@dataclass
class Diagnostic:
    code: str
    message: str
    span: Span | None
    hint: str | None = None
    severity: Severity = "error"
    labels: list[Label] = field(default_factory=list)


class CompileError(Exception):
    """Raised by a compiler stage with every error it found; warnings ride along."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("; ".join(d.message for d in diagnostics))
        self.diagnostics = diagnostics


class DiagnosticBag:
    """Collects diagnostics of one stage; `raise_if_errors` stops the pipeline after the stage."""

    def __init__(self) -> None:
        self.items: list[Diagnostic] = []

    def error(
        self, code: str, message: str, span: Span | None, hint: str | None = None, labels: list[Label] | None = None
    ) -> None:
        self._add(Diagnostic(code, message, span, hint, "error", list(labels or [])))

    def warning(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self._add(Diagnostic(code, message, span, hint, "warning"))

    def _add(self, diag: Diagnostic) -> None:
        key = (diag.code, diag.message, diag.span)
        if all((d.code, d.message, d.span) != key for d in self.items):  # every error once
            self.items.append(diag)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "warning"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise CompileError(self.items)


class SourceMap:
    """All source files a compilation read, so a span in an imported file still renders."""

    def __init__(self) -> None:
        self.files: dict[str, Source] = {}

    def add(self, source: Source) -> None:
        self.files[source.path] = source

    def get(self, path: str) -> Source | None:
        return self.files.get(path)


def render(diag: Diagnostic, sources: SourceMap) -> str:
    """Plain-text rendering: `file:line:col: error[E0NN]: message`, the source line, a caret, a hint."""
    source = sources.get(diag.span.file) if diag.span else None
    head = f"{diag.severity}[{diag.code}]: {diag.message}"
    if diag.span is None or source is None:
        where = f"{diag.span.file}: " if diag.span else ""
        lines = [f"{where}{head}"]
    else:
        line, col = source.line_col(diag.span.start)
        lines = [f"{source.path}:{line}:{col}: {head}", *_snippet(source, diag.span, "")]
        for label in diag.labels:
            other = sources.get(label.span.file)
            if other is not None:
                lline, lcol = other.line_col(label.span.start)
                lines.append(f"  note: {label.note} ({other.path}:{lline}:{lcol})")
                lines.extend(_snippet(other, label.span, ""))
    if diag.hint:
        lines.append(f"  = hint: {diag.hint}")
    return "\n".join(lines)


def _snippet(source: Source, span: Span, note: str) -> list[str]:
    line, col = source.line_col(span.start)
    end_line, end_col = source.line_col(max(span.start, span.end - 1))
    text = source.line_text(line).replace("\t", " ")
    width = (end_col - col + 1) if end_line == line else max(1, len(text) - col + 1)
    gutter = " " * len(str(line))
    return [
        f" {gutter} |",
        f" {line} | {text}",
        f" {gutter} | {' ' * (col - 1)}{'^' * max(1, width)}{' ' + note if note else ''}",
    ]


def to_json(diags: Iterable[Diagnostic], sources: SourceMap) -> str:
    """One JSON document for editors: a list of {severity, code, message, file, line, col, ...}."""
    out = []
    for d in diags:
        item: dict[str, object] = {"severity": d.severity, "code": d.code, "message": d.message, "hint": d.hint}
        source = sources.get(d.span.file) if d.span else None
        if d.span is not None:
            item["file"] = d.span.file
            if source is not None:
                item["line"], item["col"] = source.line_col(d.span.start)
                item["end_line"], item["end_col"] = source.line_col(d.span.end)
        out.append(item)
    return json.dumps(out, indent=2)

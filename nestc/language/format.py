"""The formatter: prints an AST back in canonical form, keeping the comments.

Canonical form: two-space indentation, one item or statement per line (runs of schedule statements such as
`update ...; read ...; outer gradient ...` share a line), aligned statement keywords, single spaces around
operators, parentheses only where precedence needs them, numbers as written. Statement order is kept, so
parse(format(ast)) == ast (spans aside). Comments stay on their own line before the node that follows
them, or at the end of the line they ended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..diagnostics import Source
from . import ast

INDENT = "  "
KEYWORD_WIDTH = 10  # `objective ` / `optimizer `: the widest expression statement keywords
SCHEDULE = {"update", "read", "outer gradient", "decay", "stopgrad targets", "params"}
ONE_LINE_LEVEL = 100  # an outer level with at most three statements stays on one line up to this width

# Binding strength, loosest first (mirrors the grammar).
SEQ, PIPE, PER, SUM, PRODUCT, UNARY, ATOM = range(7)


@dataclass
class Comment:
    offset: int
    line: int
    text: str
    own_line: bool
    emitted: bool = False


def extract_comments(source: Source) -> list[Comment]:
    """Every `# ...` comment outside a string literal, with its position."""
    comments = []
    for match in re.finditer(r'"[^"\n]*"|#[^\n]*', source.text):
        if match.group().startswith("#"):
            line, col = source.line_col(match.start())
            before = source.line_text(line)[: col - 1]
            comments.append(Comment(match.start(), line, match.group().rstrip(), own_line=not before.strip()))
    return comments


class Formatter:
    def __init__(self, source: Source, comments: list[Comment]) -> None:
        self.source = source
        self.comments = comments
        self.lines: list[str] = []

    # ---- comments
    def _leading(self, before: int, indent: str) -> None:
        """Own-line comments that come before an offset, at the current indentation."""
        for c in self.comments:
            if not c.emitted and c.offset < before:
                c.emitted = True
                self.lines.append(f"{indent}{c.text}")

    def _emit(self, text: str, nodes_end: list[int], indent: str) -> None:
        """A line of code, with the trailing comments of the source lines its nodes ended on."""
        end_lines = {self.source.line_col(max(0, end - 1))[0] for end in nodes_end}
        # At most one trailing comment per line: a second would become part of the first when parsed back;
        # any other stays pending and is printed on its own line before the next node.
        trailing = [c for c in self.comments if not c.emitted and not c.own_line and c.line in end_lines][:1]
        for c in trailing:
            c.emitted = True
        suffix = "".join(f"  {c.text}" for c in trailing)
        self.lines.append(f"{indent}{text}{suffix}")

    # ---- top level
    def format(self, system: ast.System) -> str:
        for imp in system.imports:
            self._leading(imp.span.start, "")
            self._emit(f'import "{imp.path}"', [imp.span.end], "")
        if system.imports:
            self.lines.append("")
        self._leading(system.span.start, "")
        if system.is_fragment:
            header = f"fragment {system.name.id} {{"
        else:
            params = ", ".join(f"{p.name.id} = {expr(p.default)}" for p in system.params)
            header = f"system {system.name.id}({params}) {{"
        ends = [system.name.span.end, *(p.span.end for p in system.params)]
        self._emit(header, ends, "")
        previous: ast.Level | ast.Binding | None = None
        for item in system.items:
            if previous is not None and (isinstance(item, ast.Level) or isinstance(previous, ast.Level)):
                self.lines.append("")
            self._item(item)
            previous = item
        self._leading(system.span.end, INDENT)
        self._emit("}", [system.span.end], "")
        self._leading(len(self.source.text) + 1, "")
        return "\n".join(self.lines) + "\n"

    def _item(self, item: ast.Level | ast.Binding) -> None:
        self._leading(item.span.start, INDENT)
        if isinstance(item, ast.Binding):
            self._emit(f"{item.name.id} = {expr(item.value)}", [item.span.end], INDENT)
            return
        head = f"level {item.name.id}"
        if item.range is not None:
            head += f"[{item.range.var.id} in {expr(item.range.over)}]"
        if item.owner is not None:
            head += f" in {item.owner.id}"
        one_line = f"{head} {{ {'; '.join(statement(s, False) for s in item.statements)} }}"
        inner_comments = any(not c.emitted and item.span.start < c.offset < item.span.end for c in self.comments)
        if self._fits_one_line(item) and len(INDENT + one_line) <= ONE_LINE_LEVEL and not inner_comments:
            self._emit(one_line, [s.span.end for s in item.statements] + [item.span.end], INDENT)
            return
        self._emit(f"{head} {{", [item.name.span.end], INDENT)
        self._statements(item.statements)
        self._leading(item.span.end, INDENT * 2)
        self._emit("}", [item.span.end], INDENT)

    @staticmethod
    def _fits_one_line(level: ast.Level) -> bool:
        return 0 < len(level.statements) <= 3 and not any(s.keyword == "memory" for s in level.statements)

    def _statements(self, statements: tuple[ast.Statement, ...]) -> None:
        indent = INDENT * 2
        run: list[ast.Statement] = []

        def flush() -> None:
            if run:
                self._emit("; ".join(statement(s, False) for s in run), [s.span.end for s in run], indent)
                run.clear()

        for stmt in statements:
            if stmt.keyword in SCHEDULE:
                if not run:
                    self._leading(stmt.span.start, indent)
                elif any(not c.emitted and c.own_line and c.offset < stmt.span.start for c in self.comments):
                    flush()
                    self._leading(stmt.span.start, indent)
                run.append(stmt)
                continue
            flush()
            self._leading(stmt.span.start, indent)
            self._emit(statement(stmt, True), [stmt.span.end], indent)
        flush()


def statement(stmt: ast.Statement, aligned: bool) -> str:
    value = stmt.value
    keyword = stmt.keyword.ljust(KEYWORD_WIDTH - 1) if aligned else stmt.keyword
    if isinstance(value, ast.Frequency):
        return f"{keyword} {frequency(value)}"
    if isinstance(value, ast.GradientMode):
        count = f" {expr(value.count)}" if value.count is not None else ""
        return f"{keyword} {value.mode}{count}"
    if isinstance(value, ast.Selectors):
        return f"{keyword} {', '.join(n.id for n in value.names)}"
    if stmt.keyword == "stopgrad targets":
        return "stopgrad targets"
    if stmt.keyword == "read" and stmt.count is not None:
        return f"{keyword} {expr(value)} every {expr(stmt.count)} tokens"
    return f"{keyword} {expr(value)}"


def frequency(freq: ast.Frequency) -> str:
    if freq.unit == "frozen":
        return "frozen"
    if freq.count is None:
        return f"every {freq.unit}"
    return f"every {expr(freq.count)} {freq.unit}s"


def expr(e: ast.Expr, context: int = SEQ) -> str:
    """An expression, parenthesised when it binds looser than its context."""
    text, strength = _expr(e)
    return f"({text})" if strength < context else text


def _expr(e: ast.Expr) -> tuple[str, int]:
    if isinstance(e, ast.Number):
        return e.text, ATOM
    if isinstance(e, ast.Name):
        return e.id, ATOM
    if isinstance(e, ast.Indexed):
        return f"{e.name.id}[{e.index.text}]", ATOM
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(expr(i) for i in e.items) + "]", ATOM
    if isinstance(e, ast.Call):
        args = [expr(a) for a in e.args] + [f"{k.name.id} = {expr(k.value)}" for k in e.kwargs]
        return f"{e.fn.id}({', '.join(args)})", ATOM
    if isinstance(e, ast.Neg):
        return f"-{expr(e.operand, UNARY)}", UNARY
    if isinstance(e, ast.BinOp):
        level = SUM if e.op in "+-" else PRODUCT
        return f"{expr(e.left, level)} {e.op} {expr(e.right, level + 1)}", level
    if isinstance(e, ast.Per):
        return f"{expr(e.value, SUM)} per {e.axis.id}", PER
    if isinstance(e, ast.Pipe):
        stages = " |> ".join(expr(s, ATOM) for s in e.stages)
        return f"{expr(e.value, PER)} |> {stages}", PIPE
    assert isinstance(e, ast.Sequence)
    return " -> ".join(expr(i, PIPE) for i in e.items), SEQ


def format_source(source: Source, system: ast.System) -> str:
    """The canonical text of a parsed spec."""
    return Formatter(source, extract_comments(source)).format(system)

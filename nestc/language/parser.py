"""Text to AST: the lark parser, a tree transformer that keeps spans, and friendly syntax errors."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ..diagnostics import CompileError, Diagnostic, Source, Span
from . import ast

MAX_NAME = 64  # the IR's and the runtime plan's identifier patterns allow 64 characters
MAX_DEPTH = 128  # parse-tree depth; the stages after parsing recurse over it

# What users call the terminals lark names (lark would print LBRACE; people want `{`).
FRIENDLY_TERMINALS = {
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "COMMA": "`,`",
    "SEMICOLON": "`;`",
    "EQUAL": "`=`",
    "NAME": "a name",
    "NUMBER": "a number",
    "PLUS": "`+`",
    "MINUS": "`-`",
    "STAR": "`*`",
    "SLASH": "`/`",
    "ROLE": "`queries`, `keys` or `values`",
    "DECAY": "`after` or `before`",
    "READ_MODE": "`online`, `before` or `boundary`",
    "$END": "the end of the file",
}

MAX_EXPECTED_SHOWN = 6


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("nestc.language").joinpath("nest.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=False)


# Bad snippets whose parser state names a mistake better than "unexpected token" (lark's match_examples).
SYNTAX_EXAMPLES: dict[str, tuple[str, list[str]]] = {
    "a level statement outside a level": (
        "`update`, `memory`, `keys`, ... belong inside `level NAME { ... }`",
        ["update every token", "update every step", "memory matrix", "read online", "keys linear(x)"],
    ),
    "an operator has nothing on one side": (
        "each `->` composes two layers or levels: `a -> b`",
        ["model = a -> }", "model = -> a"],
    ),
}
NAMED_HINTS = {label: hint for label, (hint, _) in SYNTAX_EXAMPLES.items()} | {
    "a parameter needs a default value": "write parameters as `name = value`, e.g. `system s(d = 64)`"
}
PARAMETER_EXAMPLES = (
    "system s(d) { }",
    "system s(d 64) { }",
    "system s(a = 1, d) { }",
    "system s(a = 1, b = 2, d) { }",
)
# Parser states depend on what precedes the error, so each body snippet is tried after a few prefixes.
_PREFIXES = [
    f"system s({params}) {{ {items} "
    for params in ("", "d = 1", "d = 1, e = 2", "d = 1, e = 2, f = 3")
    for items in ("", "level a { } ", "b = c ", "level a { } b = c ", "b = c level a { } ")
]


@lru_cache(maxsize=1)
def _examples() -> dict[str, list[str]]:
    examples = {
        label: [p + body for p in _PREFIXES for body in bodies] for label, (_, bodies) in SYNTAX_EXAMPLES.items()
    }
    examples["a parameter needs a default value"] = list(PARAMETER_EXAMPLES)
    return examples


def parse(source: Source) -> ast.System:
    """Parse one spec file; raises CompileError with a single syntax diagnostic on bad input."""
    try:
        tree = _parser().parse(source.text)
    except UnexpectedInput as exc:
        raise CompileError([_syntax_diagnostic(exc, source)]) from None
    _check_limits(tree, source)
    try:
        system = _ToAst(source).transform(tree)
    except VisitError as exc:  # unwrap to the original error raised inside the transformer
        raise exc.orig_exc from None
    assert isinstance(system, ast.System)
    return system


def _check_limits(tree: Tree[Token], source: Source) -> None:
    """Names reach the IR, plan files and generated kernels, which accept at most MAX_NAME characters; the later
    stages walk the tree recursively, so it may nest at most MAX_DEPTH deep. Walked without recursion; the first
    offence in the file is reported."""
    found: list[tuple[int, int, str, str]] = []  # (start, end, message, hint)
    stack: list[tuple[Tree[Token], int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            start = getattr(node.meta, "start_pos", 0) if not getattr(node.meta, "empty", True) else 0
            end = getattr(node.meta, "end_pos", start) if not getattr(node.meta, "empty", True) else start
            found.append((start, end, f"this is nested more than {MAX_DEPTH} deep", "write it with less nesting"))
            continue
        # `a |> f |> g` is one flat node that later stages nest, one level per stage
        step = len(node.children) if node.data == "pipeline" else 1
        for child in node.children:
            if isinstance(child, Tree):
                stack.append((child, depth + step))
            elif isinstance(child, Token) and child.type == "NAME" and len(child) > MAX_NAME:
                start = child.start_pos or 0
                message = f"the name `{str(child)[:16]}...` is {len(child)} characters long"
                found.append((start, start + len(child), message, f"names have at most {MAX_NAME} characters"))
    if found:
        start, end, message, hint = min(found)
        raise CompileError([Diagnostic("E016", message, source.span(start, end), hint)])


def _terminal_name(name: str) -> str:
    if name in FRIENDLY_TERMINALS:
        return FRIENDLY_TERMINALS[name]
    pattern = _parser().get_terminal(name).pattern.value if name in _terminal_names() else name
    return f"`{pattern}`" if pattern.isidentifier() or len(pattern) <= 2 else name.lower()


@lru_cache(maxsize=1)
def _terminal_names() -> frozenset[str]:
    return frozenset(t.name for t in _parser().terminals)


def _expected(names: set[str]) -> str:
    shown = sorted({_terminal_name(n) for n in names if not n.startswith("__")})
    if len(shown) > MAX_EXPECTED_SHOWN:
        shown = shown[:MAX_EXPECTED_SHOWN] + ["..."]
    return ", ".join(shown)


def _syntax_diagnostic(exc: UnexpectedInput, source: Source) -> Diagnostic:
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        operator = source.text[max(0, pos - 1) : pos + 1]
        if operator in ("->", "|>"):  # lexed as `-` / `|` because the operator cannot come here
            return Diagnostic(
                "E001",
                f"unexpected `{operator}`",
                source.span(pos - 1, pos + 1),
                hint="each `->` composes two layers or levels: `a -> b`",
            )
        char = source.text[pos] if pos < len(source.text) else ""
        return Diagnostic(
            "E002",
            f"unexpected character {char!r}",
            source.span(pos, pos + 1),
            hint="names are letters, digits and `_`; comments start with `#`",
        )
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        end = len(source.text.rstrip())
        return Diagnostic(
            "E003",
            "the file ends in the middle of a definition",
            source.span(max(0, end - 1), max(1, end)),
            hint="is a closing `}` or `)` missing?",
        )
    assert isinstance(exc, UnexpectedToken)
    token: Token = exc.token
    named = _named_mistake(exc, source.text)
    start = token.start_pos if token.start_pos is not None else 0
    end = token.end_pos if token.end_pos is not None else start + 1
    message = f"unexpected {_describe(token)}"
    hint = f"expected {_expected(set(exc.expected))}"
    if named is not None:
        message, hint = f"{message}: {named}", NAMED_HINTS[named]
    return Diagnostic("E001", message, source.span(start, max(end, start + 1)), hint=hint)


def _named_mistake(exc: UnexpectedInput, text: str) -> str | None:
    try:
        label = exc.match_examples(_parser().parse, _examples(), use_accepts=True)
    except Exception:  # match_examples re-parses snippets; a failure there must not hide the real error
        return None
    return label if isinstance(label, str) else None


def _describe(token: Token) -> str:
    if token.type == "NAME":
        return f"name `{token}`"
    if token.type == "NUMBER":
        return f"number `{token}`"
    return f"`{token}`"


@v_args(meta=True)
class _ToAst(Transformer[Any, Any]):
    """Lark tree to AST nodes, each with the span lark recorded for it."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source

    def _span(self, meta: Any) -> Span:
        if getattr(meta, "empty", True):
            return self.source.span(0, 0)
        return self.source.span(meta.start_pos, meta.end_pos)

    def _tok(self, token: Token) -> Span:
        start = token.start_pos or 0
        return self.source.span(start, token.end_pos if token.end_pos is not None else start + len(token))

    def _name(self, token: Token) -> ast.Name:
        return ast.Name(str(token), self._tok(token))

    # ---- expressions
    def number(self, meta: Any, children: list[Token]) -> ast.Number:
        (tok,) = children
        return ast.Number(float(tok), str(tok), self._tok(tok))

    def name(self, meta: Any, children: list[Token]) -> ast.Name:
        return self._name(children[0])

    def call(self, meta: Any, children: list[Any]) -> ast.Call:
        fn, *rest = children
        args = tuple(c for c in rest if not isinstance(c, ast.Kwarg))
        kwargs = tuple(c for c in rest if isinstance(c, ast.Kwarg))
        return ast.Call(self._name(fn), args, kwargs, self._span(meta))

    def indexed(self, meta: Any, children: list[Token]) -> ast.Indexed:
        name, index = children
        return ast.Indexed(self._name(name), ast.Number(float(index), str(index), self._tok(index)), self._span(meta))

    def list_expr(self, meta: Any, children: list[Any]) -> ast.ListExpr:
        return ast.ListExpr(tuple(c for c in children if c is not None), self._span(meta))

    def kwarg(self, meta: Any, children: list[Any]) -> ast.Kwarg:
        name, value = children
        return ast.Kwarg(self._name(name), value, self._span(meta))

    def _binop(op: str) -> Any:  # type: ignore[misc]  # noqa: N805 - a factory used in the class body
        def method(self: _ToAst, meta: Any, children: list[Any]) -> ast.BinOp:
            left, right = children
            return ast.BinOp(op, left, right, self._span(meta))

        return method

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    div = _binop("/")

    def neg(self, meta: Any, children: list[Any]) -> ast.Neg:
        return ast.Neg(children[0], self._span(meta))

    def per(self, meta: Any, children: list[Any]) -> ast.Per:
        value, axis = children
        return ast.Per(value, self._name(axis), self._span(meta))

    def pipeline(self, meta: Any, children: list[Any]) -> ast.Pipe:
        value, *stages = children
        return ast.Pipe(value, tuple(stages), self._span(meta))

    def sequence(self, meta: Any, children: list[Any]) -> ast.Sequence:
        return ast.Sequence(tuple(children), self._span(meta))

    # ---- frequencies and gradient modes
    def every_token(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return ast.Frequency("token", None, self._span(meta))

    def every_tokens(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return ast.Frequency("token", self._count(children[0]), self._span(meta))

    def every_step(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return ast.Frequency("step", None, self._span(meta))

    def every_steps(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return ast.Frequency("step", self._count(children[0]), self._span(meta))

    def frozen(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return ast.Frequency("frozen", None, self._span(meta))

    def _count(self, tok: Token) -> ast.Number | ast.Name:
        if tok.type == "NUMBER":
            return ast.Number(float(tok), str(tok), self._tok(tok))
        return self._name(tok)

    def grad_through(self, meta: Any, children: list[Any]) -> ast.GradientMode:
        return ast.GradientMode("through", None, self._span(meta))

    def grad_stop(self, meta: Any, children: list[Any]) -> ast.GradientMode:
        return ast.GradientMode("stop", None, self._span(meta))

    def grad_truncate(self, meta: Any, children: list[Any]) -> ast.GradientMode:
        return ast.GradientMode("truncate", self._count(children[0]), self._span(meta))

    # ---- statements
    def _stmt(keyword: str) -> Any:  # type: ignore[misc]  # noqa: N805
        def method(self: _ToAst, meta: Any, children: list[Any]) -> ast.Statement:
            return ast.Statement(keyword, children[-1], self._span(meta))

        return method

    memory_stmt = _stmt("memory")
    objective_stmt = _stmt("objective")
    optimizer_stmt = _stmt("optimizer")
    update_stmt = _stmt("update")
    gradient_stmt = _stmt("outer gradient")

    def role_stmt(self, meta: Any, children: list[Any]) -> ast.Statement:
        role, value = children
        return ast.Statement(str(role), value, self._span(meta))

    def decay_stmt(self, meta: Any, children: list[Any]) -> ast.Statement:
        return ast.Statement("decay", self._name(children[0]), self._span(meta))

    def read_stmt(self, meta: Any, children: list[Any]) -> ast.Statement:
        count = children[1] if len(children) > 1 else None
        return ast.Statement("read", self._name(children[0]), self._span(meta), count)

    def read_every(self, meta: Any, children: list[Token]) -> ast.Number | ast.Name:
        return self._count(children[0])

    def stopgrad_stmt(self, meta: Any, children: list[Any]) -> ast.Statement:
        span = self._span(meta)
        return ast.Statement("stopgrad targets", ast.Name("targets", span), span)

    def params_stmt(self, meta: Any, children: list[Token]) -> ast.Statement:
        span = self._span(meta)
        return ast.Statement("params", ast.Selectors(tuple(self._name(t) for t in children), span), span)

    # ---- top level
    def owner(self, meta: Any, children: list[Token]) -> ast.Name:
        return self._name(children[0])

    def level_range(self, meta: Any, children: list[Any]) -> ast.LevelRange:
        var, over = children
        return ast.LevelRange(self._name(var), over, self._span(meta))

    def level(self, meta: Any, children: list[Any]) -> ast.Level:
        name, *rest = children
        level_range = next((c for c in rest if isinstance(c, ast.LevelRange)), None)
        owner = next((c for c in rest if isinstance(c, ast.Name)), None)
        statements = tuple(c for c in rest if isinstance(c, ast.Statement))
        return ast.Level(self._name(name), owner, statements, self._span(meta), level_range)

    def binding(self, meta: Any, children: list[Any]) -> ast.Binding:
        name, value = children
        return ast.Binding(self._name(name), value, self._span(meta))

    def param(self, meta: Any, children: list[Any]) -> ast.Param:
        name, value = children
        return ast.Param(self._name(name), value, self._span(meta))

    def system(self, meta: Any, children: list[Any]) -> ast.System:
        name, *rest = children
        params = tuple(c for c in rest if isinstance(c, ast.Param))
        items = tuple(c for c in rest if isinstance(c, (ast.Level, ast.Binding)))
        return ast.System(self._name(name), params, items, self._span(meta))

    def fragment(self, meta: Any, children: list[Any]) -> ast.System:
        name, *items = children
        return ast.System(self._name(name), (), tuple(items), self._span(meta), is_fragment=True)

    def import_stmt(self, meta: Any, children: list[Token]) -> ast.Import:
        return ast.Import(str(children[0])[1:-1], self._span(meta))

    def start(self, meta: Any, children: list[Any]) -> ast.System:
        *imports, body = children
        return dataclasses.replace(body, imports=tuple(imports))

"""The abstract syntax of a .nest file. Every node keeps the span it was parsed from.

The AST mirrors the text (the formatter prints it back); meaning is given later by elaboration into the IR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..diagnostics import Span

# ---- expressions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: float
    text: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Name:
    id: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Indexed:
    """`cms[1]`: one instance of a level repeated over a list."""

    name: Name
    index: Number
    span: Span = field(compare=False)


@dataclass(frozen=True)
class ListExpr:
    """`[16, 64, 256]`: a list parameter or argument."""

    items: tuple[Expr, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Kwarg:
    name: Name
    value: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Call:
    fn: Name
    args: tuple[Expr, ...]
    kwargs: tuple[Kwarg, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * /
    left: Expr
    right: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Per:
    """`expr per head` / `expr per channel`: the shape a rate or memory is given along heads or channels."""

    value: Expr
    axis: Name
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Pipe:
    """`value |> f |> g(...)`: apply the stages left to right (g(f(value)))."""

    value: Expr
    stages: tuple[Name | Call, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Sequence:
    """`a -> b -> c`: a composition applied left to right."""

    items: tuple[Expr, ...]
    span: Span = field(compare=False)


Expr = Number | Name | Indexed | ListExpr | Call | BinOp | Neg | Per | Pipe | Sequence

# ---- frequencies and modes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Frequency:
    """`every token` (unit token, count None), `every C tokens`, `every step`, `every N steps`, `frozen`."""

    unit: str  # "token" | "step" | "frozen"
    count: Number | Name | None
    span: Span = field(compare=False)


@dataclass(frozen=True)
class GradientMode:
    mode: str  # "through" | "stop" | "truncate"
    count: Number | Name | None
    span: Span = field(compare=False)


# ---- statements, levels, system -----------------------------------------------------------------------


@dataclass(frozen=True)
class Selectors:
    """`params matrices, gains`: which parameters an optimizer level trains."""

    names: tuple[Name, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Statement:
    """One statement of a level body. `keyword` is the statement's word (memory, keys, update, ...).

    `count` is the coarser boundary of `read boundary every N tokens`."""

    keyword: str
    value: Expr | Frequency | GradientMode | Selectors
    span: Span = field(compare=False)
    count: Number | Name | None = None


@dataclass(frozen=True)
class LevelRange:
    """`level cms[c in chunks]`: one level per element of a list, with `c` bound to the element."""

    var: Name
    over: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Level:
    name: Name
    owner: Name | None
    statements: tuple[Statement, ...]
    span: Span = field(compare=False)
    range: LevelRange | None = None


@dataclass(frozen=True)
class Binding:
    name: Name
    value: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Param:
    name: Name
    default: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Import:
    path: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class System:
    """A whole spec (`system NAME(params) { ... }`) or an importable fragment (`fragment NAME { ... }`)."""

    name: Name
    params: tuple[Param, ...]
    items: tuple[Level | Binding, ...]
    span: Span = field(compare=False)
    imports: tuple[Import, ...] = ()
    is_fragment: bool = False

    @property
    def levels(self) -> list[Level]:
        return [i for i in self.items if isinstance(i, Level)]

    @property
    def bindings(self) -> list[Binding]:
        return [i for i in self.items if isinstance(i, Binding)]

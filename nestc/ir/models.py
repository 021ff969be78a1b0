"""The IR: typed pydantic models of a checked system, with a JSON round trip.

The IR says what a system *means*; it still carries spans so that checks and lowering can point at the
source. Expressions are small trees over the level input `x`; model compositions are trees over layers and
level uses. Names that will reach generated code are validated identifiers (see `Identifier`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..diagnostics import Span

Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- expressions -------------------------------------------------------------------------------------


class Const(_Model):
    op: Literal["const"] = "const"
    value: float


class Input(_Model):
    """The level's input `x` (the hidden state entering the layer that uses the level)."""

    op: Literal["input"] = "input"


class Linear(_Model):
    """A learned projection of its argument; its output width is decided by where it is used."""

    op: Literal["linear"] = "linear"
    id: Identifier
    arg: Expr


class Fn(_Model):
    """An elementwise or per-vector function of its argument (sigmoid, l2norm, ...)."""

    op: Literal["fn"] = "fn"
    fn: Identifier
    arg: Expr


class Bin(_Model):
    op: Literal["bin"] = "bin"
    kind: Literal["+", "-", "*", "/"]
    left: Expr
    right: Expr


class Read(_Model):
    """A read of another level's memory inside an expression, at a stated state."""

    op: Literal["read"] = "read"
    level: Identifier
    mode: Literal["online", "before", "boundary"]
    arg: Expr
    span: Span | None = None


Expr = Annotated[Const | Input | Linear | Fn | Bin | Read, Field(discriminator="op")]


def expr_reads(expr: Expr) -> list[Read]:
    """Every level read inside an expression (for the evaluation-order graph)."""
    if isinstance(expr, Read):
        return [expr, *expr_reads(expr.arg)]
    if isinstance(expr, (Linear, Fn)):
        return expr_reads(expr.arg)
    if isinstance(expr, Bin):
        return expr_reads(expr.left) + expr_reads(expr.right)
    return []


def is_constant(expr: Expr) -> bool:
    if isinstance(expr, Const):
        return True
    if isinstance(expr, Bin):
        return is_constant(expr.left) and is_constant(expr.right)
    if isinstance(expr, Fn):
        return is_constant(expr.arg)
    return False


# ---- levels ------------------------------------------------------------------------------------------


class Frequency(_Model):
    """How often a level updates. `every token` is unit token with count 1 (C = 1)."""

    unit: Literal["token", "step", "frozen"]
    count: int = 1

    def order_key(self) -> tuple[int, int]:
        """Smaller is faster: tokens before steps before frozen, then by count."""
        return ({"token": 0, "step": 1, "frozen": 2}[self.unit], self.count)

    def describe(self) -> str:
        if self.unit == "frozen":
            return "frozen"
        if self.count == 1:
            return f"every {self.unit}"
        return f"every {self.count} {self.unit}s"


class Rate(_Model):
    """A rate (learning rate, retention): a constant or a data-dependent expression, with its shape."""

    expr: Expr
    shape: Literal["scalar", "head", "channel"] = "head"


class Memory(_Model):
    kind: Literal["matrix"]
    per_head: bool = True


class Objective(_Model):
    kind: Literal["dot", "l2"]


class InnerOptimizer(_Model):
    kind: Literal["gd"]
    lr: Rate
    retain: Rate
    decay: Literal["after", "before"] = "after"


class OuterOptimizer(_Model):
    kind: Literal["adamw", "sgd"]
    hyper: dict[str, float] = {}


class ReadMode(_Model):
    mode: Literal["online", "before", "boundary"] = "online"


class GradientMode(_Model):
    mode: Literal["through", "stop", "truncate"] = "through"
    k: int = 1


Role = Literal["queries", "keys", "values"]


class Level(_Model):
    """One level: an in-context memory (memory, roles, objective, inner optimizer) or an outer optimizer."""

    name: Identifier
    owner: Identifier | None = None
    update: Frequency
    memory: Memory | None = None
    roles: dict[Role, Expr] = {}
    objective: Objective | None = None
    inner: InnerOptimizer | None = None
    outer: OuterOptimizer | None = None
    read: ReadMode = ReadMode()
    gradient: GradientMode = GradientMode()
    span: Span
    spans: dict[str, Span] = {}  # statement keyword -> span, for diagnostics

    @property
    def in_context(self) -> bool:
        return self.memory is not None


# ---- model compositions ------------------------------------------------------------------------------


class LayerNode(_Model):
    node: Literal["layer"] = "layer"
    kind: Identifier
    span: Span


class LevelNode(_Model):
    node: Literal["level"] = "level"
    level: Identifier
    span: Span


class SeqNode(_Model):
    node: Literal["seq"] = "seq"
    items: list[Node]


class RepeatNode(_Model):
    node: Literal["repeat"] = "repeat"
    body: Node
    count: int
    name: Identifier  # the binding repeated (e.g. `block`), for grouping in displays


class ResidualNode(_Model):
    node: Literal["residual"] = "residual"
    body: Node


Node = Annotated[LayerNode | LevelNode | SeqNode | RepeatNode | ResidualNode, Field(discriminator="node")]


class System(_Model):
    name: Identifier
    params: dict[str, float | int]
    levels: list[Level]
    model: Node
    span: Span

    def level(self, name: str) -> Level:
        return next(lv for lv in self.levels if lv.name == name)

    @property
    def d(self) -> int:
        return int(self.params["d"])


for _cls in (Linear, Fn, Bin, Read, SeqNode, RepeatNode, ResidualNode, System):
    _cls.model_rebuild()

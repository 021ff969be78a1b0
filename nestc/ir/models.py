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
# A level name: an identifier, or one element of a level repeated over a list (`cms[2]`).
LevelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\[[0-9]{1,4}\])?$")]


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
    """A function of its argument: elementwise (sigmoid, ...), per head vector (l2norm, mean), or in time
    (`conv` with `size`, the causal depthwise kernel; `rope`, rotary positions)."""

    op: Literal["fn"] = "fn"
    fn: Identifier
    arg: Expr
    size: int | None = None


class RoleRef(_Model):
    """The level's own keys, values or queries, inside another of its expressions (e.g. targets)."""

    op: Literal["role"] = "role"
    role: Literal["queries", "keys", "values"]


class Bin(_Model):
    op: Literal["bin"] = "bin"
    kind: Literal["+", "-", "*", "/"]
    left: Expr
    right: Expr


class Read(_Model):
    """A read of another level's memory inside an expression, at a stated state."""

    op: Literal["read"] = "read"
    level: LevelName
    mode: Literal["online", "before", "boundary"]
    arg: Expr
    span: Span | None = None


Expr = Annotated[Const | Input | Linear | Fn | RoleRef | Bin | Read, Field(discriminator="op")]


def expr_reads(expr: Expr) -> list[Read]:
    """Every level read inside an expression (for the evaluation-order graph)."""
    if isinstance(expr, Read):
        return [expr, *expr_reads(expr.arg)]
    if isinstance(expr, (Linear, Fn)):
        return expr_reads(expr.arg)
    if isinstance(expr, Bin):
        return expr_reads(expr.left) + expr_reads(expr.right)
    return []


def expr_width(expr: Expr) -> str:
    """What an expression yields per head: "scalar", "vector" (one value per channel) or "free" (a
    `linear` whose width adapts to its use)."""
    if isinstance(expr, Const):
        return "scalar"
    if isinstance(expr, Linear):
        return "free"
    if isinstance(expr, (Input, RoleRef, Read)):
        return "vector"
    if isinstance(expr, Fn):
        return "scalar" if expr.fn == "mean" else expr_width(expr.arg)
    assert isinstance(expr, Bin)
    widths = {expr_width(expr.left), expr_width(expr.right)}
    for width in ("vector", "free"):
        if width in widths:
            return width
    return "scalar"


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
    """A rate (learning rate, momentum, retention): constant or data dependent, with its shape."""

    expr: Expr
    shape: Literal["scalar", "head", "channel"] = "head"
    span: Span | None = None  # the expression's, for the range checks


class Memory(_Model):
    """What a level stores. `matrix`: M ∈ R^{dv×dk}; `mlp`: x + [norm](W1 σ(W2 x)) with depth and
    expansion; `kv`: softmax attention over the document's keys and values (optional window, optional
    persistent prefix level); `persistent`: learned tokens, frozen in context."""

    kind: Literal["matrix", "mlp", "kv", "persistent", "gradients"]  # gradients: momentum as a level (NL §4)
    per_head: bool = True
    depth: int = 2
    expand: float = 4.0
    residual: bool = False
    norm: Literal["none", "layernorm", "rmsnorm"] = "none"
    activation: Identifier = "silu"
    window: int | None = None
    segment: int | None = None
    persistent: LevelName | None = None
    tokens: int = 0


class Objective(_Model):
    """dot: −⟨M(k), v⟩; l2: ½‖M(k) − v‖²; lp: ‖M(k) − v‖_p^p / p; huber(δ); task: the outer loss.
    With `window = c` token t's loss is the sum over its document's last c keys and values (t−c+1 … t)."""

    kind: Literal["dot", "l2", "lp", "huber", "task"]
    target: Literal["values", "targets"] = "values"
    p: float | None = None
    delta: float | None = None
    window: int | None = None  # Omega rule: ℓ_t sums the loss of the last `window` keys and values


class InnerOptimizer(_Model):
    kind: Literal["gd", "momentum_gd", "dgd", "newton_schulz", "delta_momentum"]
    lr: Rate
    retain: Rate
    momentum: Rate | None = None
    decay: Literal["after", "before"] = "after"
    steps: int | None = None  # newton_schulz iterations
    lam: float | None = None  # delta_momentum's λ
    both: bool = False  # dgd on an MLP: the rank-one factor on both maps (default: the input-side map)


class OuterOptimizer(_Model):
    kind: Literal["sgd", "momentum", "adamw", "muon", "m3", "dmgd"]
    hyper: dict[str, float] = {}


class ReadMode(_Model):
    mode: Literal["online", "before", "boundary"] = "online"
    every: int | None = None  # `read boundary every N tokens`: a coarser boundary


class GradientMode(_Model):
    mode: Literal["through", "stop", "truncate"] = "through"
    k: int = 1


Role = Literal["queries", "keys", "values", "targets"]
SELECTORS = ("all", "matrices", "embeddings", "gains", "biases", "states")


class Level(_Model):
    """One level: an in-context memory (memory, roles, objective, inner optimizer) or an outer optimizer."""

    name: LevelName
    owner: LevelName | None = None
    update: Frequency
    memory: Memory | None = None
    roles: dict[Role, Expr] = {}
    objective: Objective | None = None
    inner: InnerOptimizer | None = None
    outer: OuterOptimizer | None = None
    selectors: list[str] = []
    read: ReadMode = ReadMode()
    gradient: GradientMode = GradientMode()
    stopgrad_targets: bool = False
    span: Span
    spans: dict[str, Span] = {}  # statement keyword -> span, for diagnostics

    @property
    def in_context(self) -> bool:
        return self.memory is not None

    def inputs(self) -> dict[str, Expr]:
        """Every expression the level evaluates: its roles and its data-dependent rates, by name."""
        out: dict[str, Expr] = {str(role): expr for role, expr in self.roles.items()}
        out.update({name: rate.expr for name, rate in self.rates().items()})
        return out

    def rates(self) -> dict[str, Rate]:
        if self.inner is None:
            return {}
        out = {"lr": self.inner.lr, "retain": self.inner.retain}
        if self.inner.momentum is not None:
            out["momentum"] = self.inner.momentum
        return out


# ---- model compositions ------------------------------------------------------------------------------


class LayerNode(_Model):
    """A stateless layer of the `layer` registry (embed, head, linear, rmsnorm, swiglu, ...)."""

    node: Literal["layer"] = "layer"
    kind: Identifier
    span: Span


class LevelNode(_Model):
    """A use of an in-context level as a layer: its read of its input."""

    node: Literal["level"] = "level"
    level: LevelName
    span: Span
    read: ReadMode | None = None  # another read site of the level (`memory(read = boundary, every = 64)`)


class SeqNode(_Model):
    """`a -> b`: apply in order."""

    node: Literal["seq"] = "seq"
    items: list[Node]


class RepeatNode(_Model):
    """`block * n`: n copies, each with its own level instances (`memory[0]`, `memory[1]`, ...)."""

    node: Literal["repeat"] = "repeat"
    body: Node
    count: int
    name: Identifier  # the binding repeated (e.g. `block`), for grouping in displays


class ResidualNode(_Model):
    """`residual(body)`: x + body(x) (pre-norm when the body starts with a norm)."""

    node: Literal["residual"] = "residual"
    body: Node


class ParallelNode(_Model):
    """`a + b`: both applied to the same input, outputs summed (the independent CMS of NL Eq. 74)."""

    node: Literal["parallel"] = "parallel"
    items: list[Node]


class GateNode(_Model):
    """`a * gate(b)`: a(x) ⊙ sigmoid(linear(b(x))) (Titans MAG)."""

    node: Literal["gate"] = "gate"
    value: Node
    gate: Node


class PrefixNode(_Model):
    """`prefix(attention, memory)`: attention within its segments over [persistent ‖ memory's read at the
    segment boundary ‖ segment] (Titans MAC)."""

    node: Literal["prefix"] = "prefix"
    attention: Node
    memory: Node


Node = Annotated[
    LayerNode | LevelNode | SeqNode | RepeatNode | ResidualNode | ParallelNode | GateNode | PrefixNode,
    Field(discriminator="node"),
]

ParamValue = float | int | str | list[float | int]


class System(_Model):
    name: Identifier
    params: dict[str, ParamValue]
    levels: list[Level]
    model: Node
    span: Span

    def level(self, name: str) -> Level:
        return next(lv for lv in self.levels if lv.name == name)

    def number(self, name: str, default: float | None = None) -> float:
        value = self.params.get(name, default)
        assert isinstance(value, (int, float)), f"parameter {name} is not a number"
        return value

    @property
    def d(self) -> int:
        return int(self.number("d"))


for _cls in (Linear, Fn, Bin, Read, SeqNode, RepeatNode, ResidualNode, ParallelNode, GateNode, PrefixNode, System):
    _cls.model_rebuild()

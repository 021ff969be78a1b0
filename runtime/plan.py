"""The runtime's own plan schema: what lowering produces and what the runtime executes.

Plain dataclasses with a JSON form, so a `nestc compile` directory runs where the compiler cannot be
imported. Loading validates every name against a strict identifier pattern and every kind against the
runtime's closed registries: nothing in a plan is ever executed as code.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import RuntimeInputError

PLAN_VERSION = 2
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
INSTANCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\[[0-9]{1,4}\]){0,2}$")  # memory, cms[1], cms[1][0]

EXPR_OPS = {"const", "input", "linear", "fn", "bin", "read", "role"}
FUNCTIONS = {"sigmoid", "silu", "softplus", "tanh", "exp", "relu", "l2norm", "mean", "rope", "conv"}
LAYER_OPS = {"embed", "head", "linear", "rmsnorm", "layernorm", "l2norm", "swiglu", "silu"}
LAYER_OPS |= {"memory", "residual", "gate", "parallel", "prefix", "read"}
LEVEL_KINDS = {"matrix", "mlp", "kv"}
OPTIONS = {"depth", "expand", "residual", "norm", "activation", "window", "segment", "scale", "persistent"}
OPTIONS |= {"interleaved"}
OUTER_KINDS = {"adamw", "sgd", "momentum", "muon", "m3", "dmgd"}


@dataclass
class RatePlan:
    expr: dict[str, Any]
    shape: str  # "scalar" | "head" | "channel"


@dataclass
class LevelPlan:
    """Everything the runtime needs to run one in-context level (a template; each use is an instance).

    kind: "matrix" | "mlp" | "kv". `exprs` holds the projections by role (queries, keys, values), `rates`
    the inner optimizer's rates (lr, retain, momentum). `options` holds the kind's own settings: for mlp
    depth, expand, residual, norm, activation; for kv window, segment, scale and the number of persistent
    tokens."""

    name: str
    kind: str
    heads: int
    d_key: int
    d_value: int
    chunk: int
    read: str  # "online" | "before" | "boundary"
    gradient: str  # "through" | "stop" | "truncate"
    truncate_k: int
    exprs: dict[str, dict[str, Any]]
    rates: dict[str, RatePlan]
    objective: str | None = None  # "dot" | "l2" | "lp" | "huber" | "task"
    optimizer: str | None = None  # "gd" | "momentum_gd" | "dgd" | "newton_schulz" | "delta_momentum"
    decay: str = "after"
    options: dict[str, Any] = field(default_factory=dict)
    stopgrad_targets: bool = False
    p: float | None = None  # objective lp's exponent (None: 2)
    delta: float | None = None  # objective huber's threshold δ (None: 1)
    steps: int | None = None  # newton_schulz's iterations (None: 5)
    lam: float | None = None  # delta_momentum's λ (None: 1)
    window: int = 1  # the objective sums ℓ over the last `window` keys and values (Omega rule)
    dgd_both: bool = False  # `dgd(both)` on an MLP memory: the rank-one factor on both maps


@dataclass
class LayerPlan:
    """One step of the model. `body` holds the inner layers of residual (x + body(x)) and gate
    (body(x) ⊙ σ(W branches[0](x))); `branches` the summed alternatives of parallel."""

    op: str
    name: str  # instance name: `memory[0]`, `rmsnorm`, ...
    level: str | None = None  # for op == "memory": the level template
    body: list[LayerPlan] = field(default_factory=list)
    branches: list[list[LayerPlan]] = field(default_factory=list)
    group: str | None = None  # the repeated binding this layer belongs to, for displays
    companions: dict[str, str] = field(default_factory=dict)  # levels it reads -> their instances
    options: dict[str, Any] = field(default_factory=dict)  # for op == "read": mode and `every`


@dataclass
class OptimizerGroupPlan:
    """An outer optimizer level and the parameters it trains: those its `params` selectors name (categories
    or levels), those of the in-context levels it owns, and, for the default owner, every parameter no other
    group claims (runtime/training/optimizers_select.py resolves them). `memory`: the gradient-memory level
    whose state `sgd` steps with instead of the raw gradient ({"objective", "lr", "retain"})."""

    name: str
    kind: str  # one of OUTER_KINDS
    hyper: dict[str, float]
    every_steps: int
    owns_levels: list[str]
    default: bool
    selectors: list[str] = field(default_factory=list)
    memory: dict[str, Any] | None = None


@dataclass
class Plan:
    system: str
    # Every spec parameter, as the spec (with --set) gave it: a checkpoint records them, and eval, generate and
    # --resume refuse a checkpoint whose parameters differ (a changed chunk or read mode is another model).
    params: dict[str, float | int | str | list[float | int]]
    d: int
    vocab: int
    eod: int
    levels: dict[str, LevelPlan]
    layers: list[LayerPlan]
    optimizers: list[OptimizerGroupPlan]
    window: int | None = None  # the scheduler's window; None = the whole call
    source_hash: str = ""
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str, path: str = "plan.json") -> Plan:
        try:
            raw = json.loads(text)
            return _validate(raw)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RuntimeInputError(
                f"not a valid nestc plan ({exc})", path=path, hint="re-create it with `nestc compile SPEC -o DIR`"
            ) from None

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "plan.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @staticmethod
    def load(directory: str | Path) -> Plan:
        path = Path(directory) / "plan.json"
        if not path.is_file():
            raise RuntimeInputError(
                "no plan.json in this directory",
                path=str(directory),
                hint="create one with `nestc compile SPEC -o DIR`",
            )
        return Plan.from_json(path.read_text(), str(path))


def _name(value: Any, pattern: re.Pattern[str] = IDENTIFIER) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"bad name {value!r}")
    return value


def _choice(value: Any, allowed: set[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown kind {value!r}")
    return str(value)


def _validate_expr(expr: Any) -> dict[str, Any]:
    if not isinstance(expr, dict):
        raise ValueError("an expression must be an object")
    op = _choice(expr.get("op"), EXPR_OPS)
    if op == "const":
        float(expr["value"])
    elif op == "linear":
        _name(expr["id"])
        _validate_expr(expr["arg"])
    elif op == "fn":
        _choice(expr["fn"], FUNCTIONS)
        if expr.get("size") is not None and (not isinstance(expr["size"], int) or not 1 <= expr["size"] <= 64):
            raise ValueError(f"bad convolution size {expr['size']!r}")
        _validate_expr(expr["arg"])
    elif op == "read":
        _name(expr["level"], INSTANCE)
        _choice(expr["mode"], {"boundary"})
        _validate_expr(expr["arg"])
    elif op == "role":
        _choice(expr["role"], {"queries", "keys", "values"})
    elif op == "bin":
        _choice(expr["kind"], {"+", "-", "*", "/"})
        _validate_expr(expr["left"])
        _validate_expr(expr["right"])
    return expr


def _validate_layer(raw: dict[str, Any]) -> LayerPlan:
    op = _choice(raw["op"], LAYER_OPS)
    body = [_validate_layer(b) for b in raw.get("body", [])]
    branches = [[_validate_layer(b) for b in branch] for branch in raw.get("branches", [])]
    level = _name(raw["level"], INSTANCE) if raw.get("level") is not None else None
    group = _name(raw["group"]) if raw.get("group") is not None else None
    companions = {_name(k, INSTANCE): _name(v, INSTANCE) for k, v in raw.get("companions", {}).items()}
    options = dict(raw.get("options", {}))
    if op == "read":
        _choice(options.get("mode"), {"boundary"})
        if not isinstance(options.get("every"), int) or options["every"] < 1:
            raise ValueError(f"bad read boundary {options.get('every')!r}")
    return LayerPlan(
        op=op,
        name=_name(raw["name"], INSTANCE),
        level=level,
        body=body,
        branches=branches,
        group=group,
        companions=companions,
        options=options,
    )


def _validate_level(raw: dict[str, Any]) -> LevelPlan:
    rates = {_name(k): RatePlan(**v) for k, v in raw["rates"].items()}
    level = LevelPlan(**{**raw, "rates": rates})
    _name(level.name, INSTANCE)
    _choice(level.kind, LEVEL_KINDS)
    if level.objective is not None:
        _choice(level.objective, {"dot", "l2", "lp", "huber", "task"})
    if level.optimizer is not None:
        _choice(level.optimizer, {"gd", "momentum_gd", "dgd", "newton_schulz", "delta_momentum"})
    _choice(level.decay, {"after", "before"})
    _choice(level.read, {"online", "before", "boundary"})
    _choice(level.gradient, {"through", "stop", "truncate"})
    for key in level.options:
        _choice(key, OPTIONS)
    for rate in rates.values():
        _choice(rate.shape, {"scalar", "head", "channel"})
        _validate_expr(rate.expr)
    for role, expr in level.exprs.items():
        _choice(role, {"queries", "keys", "values", "targets"})
        _validate_expr(expr)
    for size in (level.heads, level.d_key, level.d_value, level.chunk, level.truncate_k, level.window):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"bad size {size!r}")
    return level


def _validate(raw: dict[str, Any]) -> Plan:
    if raw.get("version") != PLAN_VERSION:
        raise ValueError(f"plan version {raw.get('version')!r}, this runtime reads {PLAN_VERSION}")
    levels = {_name(k, INSTANCE): _validate_level(v) for k, v in raw["levels"].items()}
    layers = [_validate_layer(x) for x in raw["layers"]]
    optimizers = [OptimizerGroupPlan(**o) for o in raw["optimizers"]]
    for o in optimizers:
        _name(o.name)
        _choice(o.kind, OUTER_KINDS)
        for level_name in [*o.owns_levels, *o.selectors]:
            _name(level_name, INSTANCE)
        if o.memory is not None:
            _choice(o.memory.get("objective"), {"dot", "l2"})
            o.memory = {"objective": o.memory["objective"], **{k: float(o.memory[k]) for k in ("lr", "retain")}}
    return Plan(
        system=_name(raw["system"]),
        params=dict(raw["params"]),
        d=int(raw["d"]),
        vocab=int(raw["vocab"]),
        eod=int(raw["eod"]),
        levels=levels,
        layers=layers,
        optimizers=optimizers,
        window=raw.get("window"),
        source_hash=str(raw.get("source_hash", "")),
        version=PLAN_VERSION,
    )

"""The closed catalogue of words the language knows: one entry per primitive (DESIGN §5).

Elaboration resolves every kind through these tables, never by importing a name found in a spec. A new
primitive is one entry here plus its runtime form; the checker's messages list these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Signature:
    """The arguments a call takes: keyword numbers, keyword names (enums or level names), bare flags, and
    keyword rates (constant or data-dependent expressions, for inner optimizers)."""

    numbers: frozenset[str] = frozenset()
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kwarg -> allowed words (empty: a level)
    flags: frozenset[str] = frozenset()
    rates: frozenset[str] = frozenset()
    required_rates: frozenset[str] = frozenset()

    def keywords(self) -> set[str]:
        return set(self.numbers) | set(self.names) | set(self.rates)


def _sig(
    numbers: str = "", flags: str = "", rates: str = "", required: str = "", **names: tuple[str, ...]
) -> Signature:
    return Signature(
        frozenset(numbers.split()),
        dict(names),
        frozenset(flags.split()),
        frozenset(rates.split()),
        frozenset(required.split()),
    )


MEMORIES: dict[str, Signature] = {
    "matrix": _sig(),
    "mlp": _sig("depth expand", "residual", norm=("none", "layernorm", "rmsnorm"), activation=("silu", "gelu", "relu")),
    "kv": _sig("window segment scale", persistent=()),
    "persistent": _sig("tokens"),
    "gradients": _sig(),  # a key-less memory of the outer gradients of the parameters its owner trains
}

OBJECTIVES: dict[str, Signature] = {
    "dot": _sig("window"),
    "l2": _sig("window"),
    "lp": _sig("p window"),
    "huber": _sig("delta window"),
    "task": _sig(),
}
# Objective numbers that may be left out: `window = c` sums the loss over the last c keys and values (Atlas's
# Omega rule); without it the objective sees the current token only.
OPTIONAL_OBJECTIVE_NUMBERS = frozenset({"window"})

INNER_OPTIMIZERS: dict[str, Signature] = {
    "gd": _sig(rates="lr retain", required="lr"),
    "momentum_gd": _sig(rates="lr momentum retain", required="lr momentum"),
    "dgd": _sig(flags="both", rates="lr retain", required="lr"),
    "newton_schulz": _sig("steps", rates="lr momentum retain", required="lr"),
    "delta_momentum": _sig("lam", rates="lr retain", required="lr"),
}

OUTER_OPTIMIZERS: dict[str, Signature] = {
    "sgd": _sig("lr weight_decay momentum"),
    "momentum": _sig("lr beta weight_decay"),
    "adamw": _sig("lr weight_decay beta1 beta2 eps"),
    "muon": _sig("lr momentum steps weight_decay"),
    "m3": _sig("lr beta1 beta2 beta3 alpha slow_every eps steps momentum_sum v_sum"),  # *_sum: 1 = as printed
    "dmgd": _sig("lr beta expand inner_lr"),
}

# Ranges of the outer optimizers' numbers (closed low, open high where a value at the bound would not
# train or would not converge): PyTorch's own optimizers reject most of these values only when a run starts.
OUTER_RANGES: dict[str, tuple[float, float, str]] = {
    name: (0.0, math.inf, "[0, ∞)") for name in ("lr", "weight_decay", "eps", "alpha", "inner_lr")
} | {name: (0.0, 1.0, "[0, 1)") for name in ("beta", "beta1", "beta2", "beta3", "momentum")}

# Layers usable in a model composition (stateless, token-wise), and the compositions themselves.
MODEL_LAYERS = {"embed", "head", "linear", "rmsnorm", "layernorm", "l2norm", "swiglu", "silu"}
COMPOSITIONS = {"residual", "gate", "prefix"}

# Functions usable inside level expressions (projections and rates) over the level input `x`.
EXPR_FUNCTIONS = {"sigmoid", "silu", "softplus", "tanh", "exp", "relu", "l2norm", "mean", "rope"}
EXPR_FUNCTIONS_WITH_SIZE = {"conv"}  # conv(k, expr): causal depthwise convolution of width k
READ_MODES = ("online", "before", "boundary")
DECAYS = ("after", "before")

# The combinations this runtime runs in parallel (DESIGN §3); anything else runs as a scan, token by token.
# (memory, optimizer) -> the chunk sizes with a parallel form (None: every chunk size). Retention may be per
# head or per channel for all of them.
PARALLEL_FORMS: dict[tuple[str, str], set[int] | None] = {
    ("matrix", "gd"): None,
    ("matrix", "dgd"): None,
    ("matrix", "momentum_gd"): {c for c in range(2, 1 << 16)},  # decay after, no output map (rules.py)
    ("mlp", "gd"): {c for c in range(2, 1 << 16)},
    ("mlp", "momentum_gd"): {c for c in range(2, 1 << 16)},
    ("mlp", "dgd"): {c for c in range(2, 1 << 16)},
}
NEAREST_PARALLEL = {
    ("mlp", "gd"): "an MLP memory updated every token has no parallel form; `update every 16 tokens` has one",
    ("mlp", "momentum_gd"): "an MLP memory updated every token has no parallel form; `update every 16 tokens` has one",
    ("mlp", "dgd"): "an MLP memory updated every token has no parallel form; `update every 16 tokens` has one",
    ("matrix", "momentum_gd"): "`update every 16 tokens` (decay after) runs in parallel; every token, `gd` or `dgd` do",
}

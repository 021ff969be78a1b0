"""How much memory a run will need, estimated before anything is allocated, and the check against the machine.

A run holds its weights, their gradients, the outer optimizers' state, a checkpoint's copy of all that while it
is written, and the activations autograd saves for the backward pass. Parameters are counted exactly by building
the model on PyTorch's `meta` device (shapes only, no storage); activations are estimated per token from the
plan's layers with per-primitive factors (floats saved per token) calibrated against measured peaks (see
tests/test_hardening_resources.py). The estimate is meant to be within a factor of 2, which is enough to refuse
a run that cannot fit instead of letting the operating system kill it half-way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestc_runtime import CompiledModel, RuntimeInputError
from nestc_runtime.plan import LayerPlan, LevelPlan, Plan

FLOAT = 4  # bytes: the runtime trains in fp32
# Optimizer state, in floats per trained parameter (AdamW: two moments; SGD: one momentum buffer at most).
OPTIMIZER_FLOATS = {"adamw": 2, "sgd": 1}
DEFAULT_OPTIMIZER_FLOATS = 3  # an optimizer this table does not know: assume a generous amount of state
MATRIX_BLOCK = 64  # the matrix memory's parallel form works in blocks of at most this many tokens
WORKSPACE = 1.25  # the backward pass holds gradients of activations besides the saved activations
BASELINE = 64 * 2**20  # the allocator's own overhead and small buffers


@dataclass(frozen=True)
class Estimate:
    """Bytes a run needs, by kind."""

    parameters: int  # a count, not bytes
    weights: int
    gradients: int
    optimizer: int
    checkpoint: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.checkpoint + self.activations + BASELINE

    def describe(self) -> str:
        parts = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("checkpoint copy", self.checkpoint),
            ("activations", self.activations),
        ]
        shown = ", ".join(f"{name} {human(size)}" for name, size in parts if size)
        return f"{human(self.total)} ({self.parameters:,} parameters; {shown})"


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def count_parameters(plan: Plan) -> int:
    """The exact parameter count of the compiled model, built on the meta device (no memory allocated). Sizes
    too large for PyTorch to describe at all (a tensor of more than 2^63 elements) are refused here."""
    import torch

    try:
        with torch.device("meta"):
            model = CompiledModel(plan, backend="chunked")
    except (RuntimeError, TypeError, OverflowError, ValueError) as error:
        raise TooLarge(
            f"`{plan.system}` at these sizes cannot be built at all ({str(error).splitlines()[0][:160]})",
            hint="lower the spec's sizes (--set d=...)",
        ) from None
    return sum(p.numel() for p in model.parameters())


def estimate(plan: Plan, batch: int, seq_len: int, *, training: bool) -> Estimate:
    """The memory a run of `plan` on `batch` sequences of `seq_len` tokens needs (training: with gradients,
    the outer optimizers' state and checkpoint copies; otherwise weights and a forward's activations)."""
    count = count_parameters(plan)
    weights = count * FLOAT
    tokens = batch * seq_len
    per_token = _layers_floats(plan.layers, plan, seq_len)
    activations = int(tokens * per_token * FLOAT * (WORKSPACE if training else 1.0))
    if not training:
        return Estimate(count, weights, 0, 0, 0, activations)
    state_floats = max((OPTIMIZER_FLOATS.get(o.kind, DEFAULT_OPTIMIZER_FLOATS) for o in plan.optimizers), default=0)
    optimizer = count * state_floats * FLOAT
    return Estimate(count, weights, weights, optimizer, weights + optimizer, activations)


# ---- activations: floats saved per token, layer by layer ----------------------------------------------------


def _layers_floats(layers: list[LayerPlan], plan: Plan, seq_len: int) -> float:
    return sum(_layer_floats(layer, plan, seq_len) for layer in layers)


def _layer_floats(layer: LayerPlan, plan: Plan, seq_len: int) -> float:
    d, vocab = plan.d, plan.vocab
    if layer.op in ("residual", "parallel", "gate", "prefix"):
        inner = _layers_floats(layer.body, plan, seq_len)
        inner += sum(_layers_floats(branch, plan, seq_len) for branch in layer.branches)
        doubled = 2 if layer.op == "prefix" else 1  # attention runs over the retrievals interleaved with tokens
        return doubled * inner + 3 * d
    if layer.op in ("memory", "read") and layer.level is not None and layer.level in plan.levels:
        return sum(_level_floats(plan.levels[name], d, seq_len) for name in _with_producers(layer.level, plan))
    return {
        "embed": d,
        "head": 3 * vocab + d,  # logits, their log-softmax and the gradient of the logits
        "linear": 2 * d,
        "rmsnorm": 3 * d,
        "layernorm": 3 * d,
        "l2norm": 3 * d,
        "silu": 2 * d,
        "swiglu": 4 * _swiglu_hidden(d) + 2 * d,
    }.get(layer.op, 2 * d)


def _with_producers(name: str, plan: Plan) -> list[str]:
    """The level and every level its projections and rates read (transitively, each once): a producer such
    as self-modifying Titans' M_k runs its own memory op in every window of the layer that reads it."""
    found: list[str] = []
    pending = [name]
    while pending:
        current = pending.pop()
        if current in found or current not in plan.levels:
            continue
        found.append(current)
        level = plan.levels[current]
        for expr in [*level.exprs.values(), *(rate.expr for rate in level.rates.values())]:
            pending += _read_levels(expr)
    return found


def _read_levels(expr: Any) -> list[str]:
    if isinstance(expr, dict):
        own = [expr["level"]] if expr.get("op") == "read" and isinstance(expr.get("level"), str) else []
        return own + [name for value in expr.values() for name in _read_levels(value)]
    if isinstance(expr, list):
        return [name for value in expr for name in _read_levels(value)]
    return []


def _swiglu_hidden(d: int) -> int:
    return 8 * math.ceil(math.ceil(8 * d / 3) / 8)


def _level_floats(level: LevelPlan, d: int, seq_len: int) -> float:
    """A level's projections and rates (each linear map saves its input and output), then its memory op."""
    heads, dk, dv = level.heads, level.d_key, level.d_value
    projections = sum(_expr_floats(e, d, heads * dk) for e in level.exprs.values())
    projections += sum(_expr_floats(r.expr, d, heads) for r in level.rates.values())
    return projections + 3 * heads * dv + _op_floats(level, seq_len)


def _expr_floats(expr: dict, d: int, width: int) -> float:
    op = expr.get("op")
    if op == "linear":
        return width + _expr_floats(expr["arg"], d, d)
    if op in ("fn", "read"):
        return 2 * width + _expr_floats(expr["arg"], d, width)
    if op == "bin":
        return width + _expr_floats(expr["left"], d, width) + _expr_floats(expr["right"], d, width)
    return 0.0


def _op_floats(level: LevelPlan, seq_len: int) -> float:
    """The memory op's saved tensors, per token: score blocks, saved states, attention masks."""
    heads, dk, dv = level.heads, level.d_key, level.d_value
    if level.kind == "kv":
        # scaled_dot_product_attention does not keep the (T, keys) scores; the boolean mask (a byte each) stays
        window = level.options.get("window") or seq_len
        keys = min(seq_len, int(window)) + int(level.options.get("persistent", 0) or 0)
        return heads * 4 * dk + keys / 2
    if level.kind == "mlp" and level.objective == "task":
        # The read saves its queries and θ (one θ per chunk); its backward recomputes the hidden layer.
        hidden = float(level.options.get("expand", 4)) * dk
        return heads * (dk + 2 * dk * hidden / level.chunk)
    if level.kind == "mlp":
        hidden = float(level.options.get("expand", 4)) * dk
        state, per_token, span = 2 * dk * hidden, 6 * hidden + 6 * dk, level.chunk
        # A windowed objective runs `window` virtual tokens per token (runtime/ops/memory_maps.py), and its
        # chunk's score blocks are (C·c)² instead of C²: fitted to saved-tensor hooks on atlas (c = 2/4/8,
        # C = 8/16/32, d_k = 16/32; within 25%).
        window = int(level.window or 1)
        per_token *= window
        if window > 1:
            per_token += 4 * hidden * window + 7 * level.chunk * window**2
    else:
        block = min(MATRIX_BLOCK, seq_len)
        state, per_token, span = dv * dk, 4 * block + 4 * dk + 4 * dv, block
    if level.optimizer not in ("gd", "dgd", None) or (level.kind == "mlp" and level.optimizer == "dgd"):
        # No parallel form: the per-token scan saves every state. An MLP memory's dgd saves as much: its
        # factor (αI − η k kᵀ) gives every token of a chunk its own W2 (measured with saved-tensor hooks).
        saved = state
    else:
        saved = 2 * state / max(1, span)  # the parallel form saves a state per block (or chunk)
    return heads * (per_token + saved)


# ---- what the machine has -------------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable from /proc/meminfo, capped by a cgroup limit; None
    where neither can be read (then nothing is refused)."""
    found = [size for size in (_meminfo_available(), _cgroup_room()) if size is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


class TooLarge(RuntimeInputError):
    """The run would need more memory than the machine has (exit 1; `--force` runs it anyway)."""


def require_fits(plan: Plan, batch: int, seq_len: int, *, training: bool, force: bool, what: str) -> Estimate:
    """Refuse (TooLarge) a run whose estimate exceeds the available memory, unless `force`."""
    needed = estimate(plan, batch, seq_len, training=training)
    room = available_memory()
    if force or room is None or needed.total <= room:
        return needed
    raise TooLarge(
        f"{what} at batch {batch} x {seq_len} tokens needs about {needed.describe()}, "
        f"but only {human(room)} is available",
        hint="lower --batch, --seq-len or the spec's sizes (--set d=...), or pass --force to run it anyway",
    )

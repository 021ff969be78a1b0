"""Numerical faults in training: which level diverged, at which token, at which step.

Two checks, both cheap on the hot path:
- every level's read (its output, M q) is watched while the step runs: one max-abs reduction per level and window,
  read back once per step. A read beyond `limit` means the inner updates are exploding although the loss may still
  be finite;
- a loss that is NaN or infinite.
Either way the step's forward is run once more, without gradients and with the levels' probes, to find the first
token (in time, then in evaluation order) where a level's inputs or read went non-finite or past the limit. That
re-run happens only on a fault, so a healthy step pays for the reductions alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..levels import Level


@dataclass(frozen=True)
class Fault:
    """Where a step went wrong. `level` is None when no level's inputs or read are at fault (then the layers
    outside the levels, or the loss itself, diverged)."""

    step: int
    kind: str  # "NaN", "infinite", "exploding", or "elsewhere" (another process of a distributed run)
    level: str | None = None
    token: int | None = None
    row: int | None = None
    part: str | None = None  # "read" (the inner updates) or the input that went bad (keys, lr, ...)
    size: float | None = None  # the largest |read| seen, for an exploding level

    def message(self) -> str:
        if self.kind == "elsewhere":
            return f"another process of this run diverged at step {self.step} (its own error names the level)"
        part = "its read: the inner updates diverged" if self.part == "read" else f"its {self.part}"
        where = f"level `{self.level}`" + (
            f" at token {self.token} of sequence {self.row}" if self.token is not None else ""
        )
        if self.kind == "exploding":
            size = f" (|read| reached {self.size:.3g})" if self.size is not None else ""
            return f"{where} exploded at step {self.step}{size}: {part}"
        head = f"loss became {self.kind} at step {self.step}"
        return head if self.level is None else f"{head}: {where} went {self.kind} first, in {part}"


def levels_of(model: nn.Module) -> dict[str, Level]:
    """The in-context levels of a compiled model (also inside a distributed wrapper); {} for other models."""
    inner = getattr(model, "module", model)
    found = getattr(inner, "levels", None)
    return dict(found) if isinstance(found, dict) else {}


class ReadWatch:
    """The largest |read| of each level during a step, kept as tensors (no sync until `peak`)."""

    def __init__(self) -> None:
        self.peaks: dict[str, Tensor] = {}
        self.everywhere = True  # every process of a distributed run was healthy (set by the step)

    def __call__(self, instance: str, read: Tensor) -> None:
        size = read.detach().abs().amax() if read.numel() else read.new_zeros(())
        seen = self.peaks.get(instance)
        self.peaks[instance] = size if seen is None else torch.maximum(seen, size)

    def within(self, limit: float) -> bool:
        """Whether every read so far stayed finite and at most `limit` in size (0: no limit)."""
        peak = self.peak()
        return peak is None or (math.isfinite(peak[1]) and (limit <= 0 or peak[1] <= limit))

    def peak(self) -> tuple[str, float] | None:
        """(level, largest |read|) over the step, NaN counting as the largest; None if no level ran."""
        if not self.peaks:
            return None
        names = list(self.peaks)
        sizes = torch.stack([self.peaks[n].float() for n in names]).nan_to_num(nan=math.inf).tolist()
        best = max(range(len(names)), key=lambda i: sizes[i])
        return names[best], sizes[best]


@contextmanager
def watching(model: nn.Module) -> Iterator[ReadWatch]:
    """Watch every level's read while the block runs (the levels' `watch` hook)."""
    watch = ReadWatch()
    levels = levels_of(model)
    for level in levels.values():
        level.watch = watch
    try:
        yield watch
    finally:
        for level in levels.values():
            level.watch = None


def agree(healthy: bool) -> bool:
    """Whether every process of a distributed run is healthy (just `healthy` in a single process). All of them
    must skip the update together: one that skipped its backward would leave the others waiting in DDP's
    all-reduce."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return healthy
    flag = torch.tensor([0.0 if healthy else 1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() == 0.0)


def check_step(
    model: nn.Module, inputs: Tensor, loss: float, watch: ReadWatch, step: int, limit: float
) -> Fault | None:
    """The step's fault, if any: a non-finite loss or a level read beyond `limit` (0 turns that check off)."""
    peak = watch.peak()
    exploding = limit > 0 and peak is not None and peak[1] > limit
    if math.isfinite(loss) and not exploding:
        return None if watch.everywhere else Fault(step, "elsewhere")
    kind = "NaN" if math.isnan(loss) else "infinite" if math.isinf(loss) else "exploding"
    found = locate(model, inputs, limit if limit > 0 else math.inf)
    if found is None:
        if kind == "exploding" and peak is not None:
            return Fault(step, kind, peak[0], part="read", size=peak[1])
        return Fault(step, kind)
    level, row, token, part, bad_kind = found
    if kind == "exploding" or bad_kind == "exploding":
        return Fault(step, "exploding", level, token, row, part, peak[1] if peak else None)
    return Fault(step, bad_kind, level, token, row, part)


def locate(model: nn.Module, inputs: Tensor, limit: float) -> tuple[str, int, int, str, str] | None:
    """Re-run the forward with probes and find the first (token, level in evaluation order) whose inputs are not
    finite or whose read is not finite or beyond `limit`: (level, row, token, part, kind).

    The parallel form mixes the tokens of a block (a NaN times a mask's 0 is NaN), so it can show a NaN at tokens
    before the one that caused it: it only picks the sequence, which the reference interpreter then replays token
    by token, where nothing flows backwards in time."""
    inner = getattr(model, "module", model)
    if not levels_of(inner):
        return None
    first = _first_fault(inner, inputs, limit, getattr(inner, "backend", "reference"))
    if first is None or getattr(inner, "backend", "reference") == "reference":
        return first
    row = first[1]
    exact = _first_fault(inner, inputs[row : row + 1], limit, "reference")
    return first if exact is None else (exact[0], row, *exact[2:])


def _first_fault(inner: nn.Module, inputs: Tensor, limit: float, backend: str) -> tuple[str, int, int, str, str] | None:
    was_training, was_backend = inner.training, getattr(inner, "backend", backend)
    try:
        inner.backend = backend  # type: ignore[assignment]  # a CompiledModel's property
        with torch.no_grad():
            _, probes = inner(inputs, probe=True)
    finally:
        inner.backend = was_backend  # type: ignore[assignment]
        inner.train(was_training)
    best: tuple[int, int, str, int, str, str] | None = None  # (token, order, level, row, part, kind)
    for order, (level, probe) in enumerate(probes.items()):
        for part, value in probe.items():
            hit = _first_bad(value, limit if part == "output" else math.inf)
            if hit is None:
                continue
            row, token, kind = hit
            candidate = (token, order, level, row, "read" if part == "output" else part, kind)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
    if best is None:
        return None
    token, _, level, row, part, kind = best
    return level, row, token, part, kind


def _first_bad(value: Tensor, limit: float) -> tuple[int, int, str] | None:
    """(row, token, kind) of the earliest token of a probe tensor (B, H, T, ...) that is non-finite or past
    `limit` in size; None when every value is fine."""
    if not value.is_floating_point() or value.dim() < 3:
        return None
    flat = value.detach().transpose(1, 2).flatten(2)  # (B, T, H * ...)
    nonfinite = ~torch.isfinite(flat)
    bad = nonfinite | (flat.abs() > limit)
    per_token = bad.any(-1)  # (B, T)
    if not bool(per_token.any()):
        return None
    token = int(per_token.any(0).nonzero()[0])
    row = int(per_token[:, token].nonzero()[0])
    cell = flat[row, token]
    kind = "NaN" if bool(cell.isnan().any()) else "infinite" if bool(cell.isinf().any()) else "exploding"
    return row, token, kind

"""The compiled scan (DESIGN §3): a per-token recurrence run as ``torch.compile``d blocks of unrolled steps.

A combination of primitives without a parallel form runs its reference step once per token.  Eagerly
that is a Python loop dispatching every small op of every token; here ``block`` consecutive steps are
unrolled into one function and compiled once, so one compiled call does ``block`` tokens: Python
dispatch is paid once per block and the elementwise work of the steps is fused.  The tokens after the
last whole block (fewer than ``block``) run the same step eagerly, so every call length uses the one
compiled block (no recompiles per length); so do the first tokens of a call, until the carry's dtypes, shapes
and requires_grad stop changing (usually one token).  The block is a pure function of its inputs, so the result
and its gradients are those of the step itself, whatever autograd does inside it (detaches included).

Why unrolled blocks and not ``torch._higher_order_ops.scan``: in torch 2.13 that operator fails here
(its autograd rejects integer carries; with float carries inductor raises a data-dependent-output
error).  Why 4 steps: inductor's compile time grows faster than linearly with the unrolled length while
the gain flattens (momentum_gd every token, B=2, H=4, d_head=64, T=256, fwd+bwd, 1 thread: blocks of 2 / 4 / 8
compile in 4.3 / 4.6 / 59 s CPU and run 3.7 / 4.4 / 4.9x faster than the eager loop).

A configuration is compiled once it has scanned ``WARMUP_STEPS`` tokens eagerly (the compile pays off only
over many tokens; results are the same either way).

Switch: ``NESTC_COMPILED_SCAN=0`` in the environment (or ``set_compiled_scan(False)``) runs every step
eagerly; the default is on (the same ``NESTC_*`` variable plus ``set_*`` function convention as
``NESTC_COMPILE``).  Where compiling fails (no C++ compiler for inductor, an unsupported op) the scan
warns once and runs eagerly from then on.

The utility knows nothing of memories: a caller passes a step function, the carried tensors, the
per-token inputs (time on axis 2) and a hashable ``static`` argument (its configuration).
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

Carry = tuple[Tensor, ...]
Inputs = tuple[Tensor | None, ...]
# One token: step(carry, inputs_t, consts, static) -> (output_t, carry after the token).
Step = Callable[[Carry, Inputs, tuple[Tensor, ...], Any], tuple[Tensor, Carry]]
Block = Callable[[Carry, Inputs, tuple[Tensor, ...]], tuple[Tensor, Carry]]

BLOCK = 4
# Tokens a key runs eagerly before it is compiled.  Compiling costs 10-50 s of wall time (2 loaded CPU cores,
# d_head 16-64, forward and backward) and saves 0.1-2 ms a token, so short jobs (tests, a small evaluation)
# would lose: they stay eager, and a long job pays this many eager tokens first (momentum_gd, B=2, H=4,
# d_head=16, forward+backward: 3.5 s).
WARMUP_STEPS = 8192
BACKEND = "inductor"  # the torch.compile backend (tests use "aot_eager" to check the capture cheaply)
_ENABLED = {"on": os.environ.get("NESTC_COMPILED_SCAN", "1") != "0"}
_COMPILED: dict[Hashable, Block] = {}
_FAILED: set[Hashable] = set()
_SEEN: dict[Hashable, int] = {}  # tokens scanned per key (the warm-up)
_NOTED: list[bool] = []


def set_compiled_scan(on: bool) -> None:
    """Compile the scan (True, the default) or run every step eagerly (False)."""
    _ENABLED["on"] = on


def compiled_scan_enabled() -> bool:
    return _ENABLED["on"]


def reset() -> None:
    """Forget the compiled blocks and past failures (the next call compiles again)."""
    _COMPILED.clear()
    _FAILED.clear()
    _SEEN.clear()


def counts() -> dict[str, int]:
    """How many block functions were compiled ("compiled") and how many fell back to eager ("failed")."""
    return {"compiled": len(_COMPILED) - len(_FAILED), "failed": len(_FAILED)}


def scan(
    step: Step,
    carry: tuple[Tensor, ...],
    inputs: tuple[Tensor | None, ...],
    consts: tuple[Tensor, ...],
    static: Hashable,
    block: int | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Apply ``step`` to every token of ``inputs`` (each (B, H, T, ...) or None), threading ``carry``.

    Returns the outputs stacked on axis 2, (B, H, T, ...), and the carry after the last token.
    ``consts`` are tensors every step reads (they may require grad); ``static`` is hashed into the
    cache key of the compiled block, with ``step``, ``block`` (default ``BLOCK``), the backend and the
    signature of a block's tensors (``_signature``, which has no T: every call length shares the block).
    """
    block = BLOCK if block is None else block
    steps = next(x for x in inputs if x is not None).shape[2]
    # Fixed layouts, so that one compiled block serves every call: time-major inputs (a block of a
    # (B,H,T,...) tensor would have T in its strides, and a new T would recompile) and contiguous carries
    # (an expanded initial state would recompile at the second block).
    inputs = tuple(None if x is None else x.movedim(2, 0).contiguous() for x in inputs)
    carry = tuple(c.contiguous() for c in carry)
    outputs: list[Tensor] = []

    def eager(t: int) -> None:
        nonlocal carry
        out, carry = step(carry, _window(inputs, t, None), consts, static)
        outputs.append(out[:, :, None])

    done = 0
    if _ENABLED["on"] and steps > block:
        # Eager steps until the carry's signature is steady (a fresh state gains requires_grad at its first
        # token): the blocks then all share one compiled function instead of the first one compiling its own.
        while done < steps:
            before = _signature(carry)
            eager(done)
            done += 1
            if _signature(carry) == before:
                break
        key = (step, static, block, BACKEND, _signature(carry, _window(inputs, 0, block), consts))
        seen = _SEEN.get(key, 0)
        _SEEN[key] = seen + steps
        while seen >= WARMUP_STEPS and done + block <= steps:
            out, carry = _run_block(key, step, static, block, carry, _window(inputs, done, done + block), consts)
            outputs.append(out)
            done += block
    for t in range(done, steps):
        eager(t)
    if not outputs:
        raise ValueError("scan needs at least one token")
    return torch.cat(outputs, 2), carry


def valid_tokens(lengths: Tensor | None, steps: int) -> Tensor | None:
    """Which tokens of each row are real, as a per-token input (B, 1, T) (time on axis 2 like the others);
    None when every row runs the whole call. A step reads its token's mask as ``valid_t[:, 0]``."""
    if lengths is None:
        return None
    return (torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None])[:, None]


def _signature(*groups: tuple[Tensor | None, ...]) -> tuple[Any, ...]:
    """What a compiled block is specialised on: every tensor's shape, dtype and requires_grad, and the grad
    mode.  Keying the cache on it gives each specialisation its own compiled function (below)."""
    described = tuple((None if x is None else (tuple(x.shape), x.dtype, x.requires_grad)) for g in groups for x in g)
    return (torch.is_grad_enabled(), *described)


def _window(inputs: tuple[Tensor | None, ...], start: int, end: int | None) -> tuple[Tensor | None, ...]:
    """Tokens start..end-1 of every time-major input (end None: token ``start`` alone, without its time axis)."""
    if end is None:
        return tuple(None if x is None else x[start] for x in inputs)
    return tuple(None if x is None else x[start:end] for x in inputs)


def _unrolled(step: Step, static: Hashable, block: int) -> Block:
    """``block`` steps in a row, outputs stacked on axis 2: the function that gets compiled."""

    def run(carry: tuple[Tensor, ...], inputs: tuple[Tensor | None, ...], consts: tuple[Tensor, ...]) -> Any:
        outputs = []
        for t in range(block):
            out, carry = step(carry, _window(inputs, t, None), consts, static)
            outputs.append(out)
        return torch.stack(outputs, 2), carry

    # A fresh code object per key: dynamo caches compiled graphs per code object, with a small recompile
    # limit (8) shared by everything compiled from it, past which it runs eagerly without a word; one copy
    # per key (a configuration and its shapes) keeps the keys from using up each other's entries.
    return types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__, None, run.__closure__)


def _run_block(
    key: Hashable,
    step: Step,
    static: Hashable,
    block: int,
    carry: tuple[Tensor, ...],
    inputs: tuple[Tensor | None, ...],
    consts: tuple[Tensor, ...],
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One block, compiled (built at the first use of ``key``), or eager once compiling has failed."""
    if key not in _FAILED:
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(_unrolled(step, static, block), backend=BACKEND, dynamic=False)
        try:
            return _COMPILED[key](carry, inputs, consts)
        except Exception as error:  # compilation happens at the first call; the block is pure, so rerun it
            # An error of the step itself (not the compiler's) reappears here, before anything is noted.
            result = _unrolled(step, static, block)(carry, inputs, consts)
            _FAILED.add(key)
            _note(error)
            return result
    return _unrolled(step, static, block)(carry, inputs, consts)


def _note(error: Exception) -> None:
    """Say once per process that the scan runs eagerly."""
    if _NOTED:
        return
    _NOTED.append(True)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    warnings.warn(
        f"compiled scan unavailable ({type(error).__name__}: {reason[:200]}); running the scan eagerly "
        "(set NESTC_COMPILED_SCAN=0 to skip the attempt)",
        RuntimeWarning,
        stacklevel=4,
    )

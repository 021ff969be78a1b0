"""nestc: a compiler for nested learning systems.

import nestc
system = nestc.load("specs/deltanet.nest", d=128)          # the checked IR
model = nestc.compile("specs/deltanet.nest", d=128)        # an nn.Module
logits = model(tokens)                                     # (B, T) -> (B, T, vocab)
"""

from __future__ import annotations

from pathlib import Path

from nestc_runtime import CompiledModel

from .ir.models import System
from .lower.lower import lower
from .pipeline import Compilation, SpecError, SpecFileError, front_end, to_plan

__version__ = "0.1.0"


def load(path: str | Path, **params: float) -> System:
    """Parse and check a spec; `params` override its system parameters. Raises SpecError."""
    return front_end(path, params).system


def compile(spec: str | Path | System, backend: str = "auto", **params: float) -> CompiledModel:  # noqa: A001
    """Compile a spec file (or an already checked IR) into a runnable model.

    `backend`: "reference" (the token-at-a-time oracle), "chunked" (the fast path), "triton" (generated
    kernels; a GPU, or TRITON_INTERPRET=1) or "auto" (triton on a GPU, else chunked).
    """
    from .codegen import install

    install()  # the runtime asks this compiler for the kernels it runs
    if isinstance(spec, System):
        if params:
            raise TypeError("parameters apply when compiling from a spec file; load the IR with them instead")
        return CompiledModel(lower(spec), backend=backend)
    return CompiledModel(to_plan(front_end(spec, params)), backend=backend)


__all__ = ["Compilation", "SpecError", "SpecFileError", "System", "compile", "load"]

"""nestc_runtime: what a compiled nested-learning system runs on (imported as `nestc_runtime`).

It never imports the compiler: a directory written by `nestc compile SPEC -o DIR` (or a training run's
output directory) loads and runs with `nestc_runtime.load(DIR)` alone.
"""

from __future__ import annotations

from pathlib import Path

from .errors import RuntimeInputError
from .model import CompiledModel, ModelState
from .plan import Plan


def build(plan: Plan, backend: str = "auto") -> CompiledModel:
    """An untrained model for a plan."""
    return CompiledModel(plan, backend=backend)


def load(directory: str | Path, checkpoint: str | Path | None = None, backend: str = "auto") -> CompiledModel:
    """Load the plan in `directory`; with `checkpoint` (a `ckpt-*` directory), also its trained weights."""
    from .kernels.source import add_kernel_dir
    from .training.checkpoint import load_checkpoint
    from .training.loop import restore_model

    add_kernel_dir(Path(directory) / "kernels")  # the generated kernels `nestc compile -o` wrote
    model = CompiledModel(Plan.load(directory), backend=backend)
    if checkpoint is not None:
        tensors, _ = load_checkpoint(checkpoint)
        restore_model(model, tensors, str(checkpoint))
    return model


__all__ = ["CompiledModel", "ModelState", "Plan", "RuntimeInputError", "build", "load"]

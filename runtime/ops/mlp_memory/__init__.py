"""MLP-memory level: per-token reference (oracle) and chunk-parallel dual form."""

from .chunked import chunked, has_parallel_form
from .reference import scan, step
from .state import MLPMemoryConfig, MLPMemoryState, apply_memory, token_gradients

__all__ = [
    "MLPMemoryConfig",
    "MLPMemoryState",
    "apply_memory",
    "chunked",
    "has_parallel_form",
    "scan",
    "step",
    "token_gradients",
]

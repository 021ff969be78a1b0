"""Matrix-memory level: per-token reference (oracle) and block-parallel fast path."""

from .chunked import chunked
from .reference import scan, step
from .state import MatrixMemoryConfig, MatrixMemoryState

__all__ = ["MatrixMemoryConfig", "MatrixMemoryState", "chunked", "scan", "step"]

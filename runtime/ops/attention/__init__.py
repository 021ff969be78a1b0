"""`kv` memory level (causal softmax attention): per-token reference (oracle) and whole-call fast path."""

from .parallel import attend
from .reference import scan, step
from .state import AttentionConfig, AttentionState

__all__ = ["AttentionConfig", "AttentionState", "attend", "scan", "step"]

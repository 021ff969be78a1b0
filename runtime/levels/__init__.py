"""In-context levels, one registered class per memory kind."""

from .attention import AttentionLevel
from .base import Level, LevelState, Probe, where_rows
from .matrix import MatrixLevel
from .mlp import MLPLevel

LEVELS: dict[str, type[Level]] = {"matrix": MatrixLevel, "mlp": MLPLevel, "kv": AttentionLevel}

__all__ = ["LEVELS", "Level", "LevelState", "Probe", "where_rows"]

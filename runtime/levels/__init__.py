"""In-context levels, one registered class per memory kind."""

from ..plan import LevelPlan
from .attention import AttentionLevel
from .base import Level, LevelState, Probe, where_rows
from .linear_mlp import LinearMLPLevel
from .matrix import MatrixLevel
from .mlp import MLPLevel
from .task import TaskLevel

LEVELS: dict[str, type[Level]] = {"matrix": MatrixLevel, "mlp": MLPLevel, "kv": AttentionLevel}


def level_class(plan: LevelPlan) -> type[Level]:
    """The class that runs a level: by memory kind, or the task-objective MLP (CMS)."""
    if plan.objective == "task":
        return TaskLevel
    if plan.kind == "mlp" and plan.options.get("depth", 2) == 1:
        return LinearMLPLevel  # M(x) = [x +] [LN](W x): a matrix memory with an output map
    return LEVELS[plan.kind]


__all__ = ["LEVELS", "Level", "LevelState", "Probe", "level_class", "where_rows"]

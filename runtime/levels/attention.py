"""A `kv` level: causal softmax attention over the document's keys and values (optional window or
segments), with optional learned persistent tokens prepended (Titans' persistent memory)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..ops.attention import AttentionConfig, AttentionState, attend, scan
from ..plan import LevelPlan
from .base import Level


class AttentionLevel(Level):
    def __init__(self, plan: LevelPlan, d: int, instance: str) -> None:
        super().__init__(plan, d, instance)
        options = plan.options
        self.config = AttentionConfig(
            read=plan.read, window=options.get("window"), segment=options.get("segment"), scale=options.get("scale")
        )
        tokens = int(options.get("persistent", 0))
        self.persistent_keys = nn.Parameter(torch.randn(plan.heads, tokens, plan.d_key) * 0.02) if tokens else None
        self.persistent_values = nn.Parameter(torch.randn(plan.heads, tokens, plan.d_value) * 0.02) if tokens else None

    def initial_op_state(self, batch: int, like: Tensor) -> AttentionState:
        p = self.plan
        persistent = None
        if self.persistent_keys is not None and self.persistent_values is not None:
            persistent = (self.persistent_keys, self.persistent_values)
        return AttentionState.initial(
            batch, p.heads, p.d_key, p.d_value, persistent=persistent, dtype=like.dtype, device=like.device
        )

    def run(self, x: dict[str, Tensor], op_state: Any, lengths: Tensor | None, reference: bool) -> tuple[Tensor, Any]:
        op = scan if reference else attend
        return op(x["queries"], x["keys"], x["values"], op_state, self.config, lengths=lengths)

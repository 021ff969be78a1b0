"""An MLP memory of depth 1: M(x) = [x +] [LN](W x) per head (TTT-Linear's inner model f(x) = x + LN(W x)).

It is a matrix memory with an output map (``runtime/ops/memory_maps.py``), run by the matrix op, whose
initial state W_{-1} is a meta-learned parameter as for every MLP memory (TTT's learnable W0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState, chunked, scan
from ..ops.memory_maps import memory_output, run_memory
from ..plan import LevelPlan
from .base import Level, LevelState, op_settings


class LinearMLPLevel(Level):
    def __init__(self, plan: LevelPlan, d: int, instance: str) -> None:
        super().__init__(plan, d, instance)
        norm = plan.options.get("norm") == "layernorm"
        # Under LN(W x) a small W would make LN divide by a tiny spread (as for the 2-layer memory), so W then
        # starts at the usual 1/√fan-in scale; without a norm a small W keeps M ≈ [x +] 0 at first.
        scale = 1.0 if norm else 0.1
        self.init = nn.Parameter(torch.randn(plan.heads, plan.d_value, plan.d_key) * (scale / math.sqrt(plan.d_key)))
        residual = bool(plan.options.get("residual", False))
        self.config = MatrixMemoryConfig(decay=plan.decay, residual=residual, norm=norm, **op_settings(plan))

    def initial_op_state(self, batch: int, like: Tensor) -> MatrixMemoryState:
        return MatrixMemoryState.initial(self.init, batch)

    def read_at(self, state: LevelState, value: Tensor, mode: str) -> Tensor:
        op: MatrixMemoryState = state.op
        boundary = torch.where((op.phase == 0).view(-1, 1, 1, 1), op.S, op.P)  # the next token's chunk start
        q = value.unflatten(-1, (self.plan.heads, -1)).transpose(1, 2)  # (B, H, T, dk)
        z = q @ boundary.transpose(-1, -2)
        cfg = self.config
        return memory_output(z, q, cfg.residual, cfg.norm, cfg.ln_eps).transpose(1, 2).flatten(-2)

    def run(self, x: dict[str, Tensor], op_state: Any, lengths: Tensor | None, reference: bool) -> tuple[Tensor, Any]:
        return run_memory(scan, chunked, x, op_state, self.config, lengths, reference)

"""A matrix memory level (M ∈ R^{d_v×d_k} per head, initial state 0): objectives `dot`, `l2`, `lp`, `huber`;
optimizers `gd`, `momentum_gd`, `dgd`, `newton_schulz`, `delta_momentum`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState, chunked, scan
from ..ops.matrix_memory.triton import triton_chunked
from ..ops.memory_maps import run_memory
from ..plan import LevelPlan
from .base import Level, LevelState, op_settings


class MatrixLevel(Level):
    fast_path = "chunked"  # or "triton": the generated kernels (CompiledModel's backend sets it)

    def __init__(self, plan: LevelPlan, d: int, instance: str) -> None:
        super().__init__(plan, d, instance)
        self.config = MatrixMemoryConfig(decay=plan.decay, **op_settings(plan))

    def initial_op_state(self, batch: int, like: Tensor) -> MatrixMemoryState:
        p = self.plan
        return MatrixMemoryState.initial(like.new_zeros(p.heads, p.d_value, p.d_key), batch)

    def read_at(self, state: LevelState, value: Tensor, mode: str) -> Tensor:
        op: MatrixMemoryState = state.op
        boundary = torch.where((op.phase == 0).view(-1, 1, 1, 1), op.S, op.P)  # the next token's chunk start
        q = value.unflatten(-1, (self.plan.heads, -1))  # (B, T, H, dk)
        return torch.einsum("bhvk,bthk->bthv", boundary, q).flatten(-2)

    def run(self, x: dict[str, Tensor], op_state: Any, lengths: Tensor | None, reference: bool) -> tuple[Tensor, Any]:
        fast = triton_chunked if self.fast_path == "triton" else chunked
        return run_memory(scan, fast, x, op_state, self.config, lengths, reference)

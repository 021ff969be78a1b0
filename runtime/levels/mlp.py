"""An MLP memory level: M(x) = x + [LN](W1 σ(W2 x)) per head, with a meta-learned initial state
(W1, W2 are parameters of the owning level: an all-zero MLP would have no gradient)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.memory_maps import run_memory
from ..ops.mlp_memory import MLPMemoryConfig, MLPMemoryState, chunked, scan
from ..ops.mlp_memory.state import apply_memory
from ..ops.mlp_memory.triton import triton_chunked
from ..plan import LevelPlan
from .base import Level, LevelState, op_settings


class MLPLevel(Level):
    fast_path = "chunked"  # or "triton": the generated kernel (CompiledModel's backend sets it)

    def __init__(self, plan: LevelPlan, d: int, instance: str) -> None:
        super().__init__(plan, d, instance)
        heads, dk = plan.heads, plan.d_key
        hidden = int(plan.options.get("expand", 4) * dk)
        # θ_{-1}: W2 maps the key (d_k) to the hidden layer, W1 maps back. Without a norm a small W1 keeps
        # M ≈ identity at first; under LN(W1 σ(W2 x)) a small W1 would make LN divide by a tiny spread and blow
        # up every gradient through the memory, so W1 then starts at the usual 1/√fan-in scale.
        w1_scale = 1.0 if plan.options.get("norm") == "layernorm" else 0.1
        self.init2 = nn.Parameter(torch.randn(heads, hidden, dk) / math.sqrt(dk))
        self.init1 = nn.Parameter(torch.randn(heads, dk, hidden) * (w1_scale / math.sqrt(hidden)))
        self.config = MLPMemoryConfig(
            norm=plan.options.get("norm") == "layernorm",
            activation=plan.options.get("activation", "silu"),
            dgd_both=plan.dgd_both,
            **op_settings(plan),
        )

    def initial_op_state(self, batch: int, like: Tensor) -> MLPMemoryState:
        return MLPMemoryState.initial(self.init1, self.init2, batch)

    def read_at(self, state: LevelState, value: Tensor, mode: str) -> Tensor:
        op: MLPMemoryState = state.op
        start = op.phase == 0  # the next token starts a chunk: its boundary is θ now
        if bool(start.all()):  # every row at the same kind of boundary: no row merge (and no zero gradients)
            W1, W2 = op.W1, op.W2
        elif not bool(start.any()):
            W1, W2 = op.P1, op.P2
        else:
            rows = start.view(-1, 1, 1, 1)
            W1, W2 = torch.where(rows, op.W1, op.P1), torch.where(rows, op.W2, op.P2)
        x = value.unflatten(-1, (self.plan.heads, -1)).transpose(1, 2)  # (B, H, T, dk)
        return apply_memory(W1, W2, x, self.config).transpose(1, 2).flatten(-2)

    def run(self, x: dict[str, Tensor], op_state: Any, lengths: Tensor | None, reference: bool) -> tuple[Tensor, Any]:
        fast = triton_chunked if self.fast_path == "triton" else chunked
        return run_memory(scan, fast, x, op_state, self.config, lengths, reference)

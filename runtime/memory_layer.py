"""An in-context matrix-memory level used as a layer: projections, rates, and the memory op.

The same module runs one token at a time (`step`, the reference interpreter) or a whole sequence
(`forward_seq`, the chunked runtime); both share parameters, so one state_dict serves every backend.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .expressions import Expression
from .ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState, chunked, reference
from .plan import MemoryLevelPlan

Probe = dict[str, Tensor]


class MemoryLayer(nn.Module):
    def __init__(self, plan: MemoryLevelPlan, d: int, instance: str) -> None:
        super().__init__()
        self.plan = plan
        self.instance = instance  # e.g. `memory[0]`: the key of its state and probe
        heads, dk, dv = plan.heads, plan.d_key, plan.d_value
        self.queries = Expression(plan.queries, d, heads * dk, heads)
        self.keys = Expression(plan.keys, d, heads * dk, heads)
        self.values = Expression(plan.values, d, heads * dv, heads)
        self.lr = Expression(plan.lr.expr, d, heads if plan.lr.shape == "head" else 1, heads)
        self.retain = Expression(plan.retain.expr, d, heads if plan.retain.shape == "head" else 1, heads)
        self.config = MatrixMemoryConfig(
            objective=plan.objective,
            decay=plan.decay,
            chunk=plan.chunk,
            read=plan.read,
            grad=plan.gradient,
            truncate_k=plan.truncate_k,
        )

    # ---- state
    def init_state(self, batch: int, like: Tensor) -> MatrixMemoryState:
        p = self.plan
        init = like.new_zeros(p.heads, p.d_value, p.d_key)  # θ_{-1} = 0 for a matrix memory (DESIGN §3)
        return MatrixMemoryState.initial(init, batch)

    # ---- inputs
    def _inputs(self, h: Tensor) -> dict[str, Tensor]:
        """q, k: (B, H, T, dk); v: (B, H, T, dv); lr, retain: (B, H, T), from h: (B, T, d)."""
        heads = self.plan.heads

        def split(x: Tensor) -> Tensor:
            return x.unflatten(-1, (heads, -1)).transpose(1, 2)

        def rate(expr: Expression) -> Tensor:
            return expr(h).expand(*h.shape[:-1], heads).transpose(1, 2)

        return {
            "queries": split(self.queries(h)),
            "keys": split(self.keys(h)),
            "values": split(self.values(h)),
            "lr": rate(self.lr),
            "retain": rate(self.retain),
        }

    def forward_seq(
        self, h: Tensor, state: MatrixMemoryState, lengths: Tensor | None, probe: Probe | None
    ) -> tuple[Tensor, MatrixMemoryState]:
        """The chunked runtime: a whole sequence (B, T, d) -> (B, T, heads * dv)."""
        x = self._inputs(h)
        out, state = chunked(
            x["queries"], x["keys"], x["values"], x["lr"], x["retain"], state, self.config, lengths=lengths
        )
        if probe is not None:
            probe.update(x, output=out)
        return out.transpose(1, 2).flatten(-2), state

    def step(
        self, h_t: Tensor, state: MatrixMemoryState, valid: Tensor | None, probe: list[Probe] | None
    ) -> tuple[Tensor, MatrixMemoryState]:
        """The reference interpreter: one token (B, d) -> (B, heads * dv)."""
        x = {k: v.squeeze(2) for k, v in self._inputs(h_t.unsqueeze(1)).items()}
        out, state = reference.step(
            state, x["queries"], x["keys"], x["values"], x["lr"], x["retain"], self.config, valid
        )
        if probe is not None:
            probe.append({**x, "output": out})
        return out.flatten(-2), state


# ---- row-wise state manipulation (documents start and end at different tokens in different rows)


def take_rows(state: MatrixMemoryState, rows: Tensor) -> MatrixMemoryState:
    """The states of the given rows, as a new batch."""
    return state.select(rows)


def where_rows(mask: Tensor, a: MatrixMemoryState, b: MatrixMemoryState) -> MatrixMemoryState:
    """Row r from `a` where mask[r], else from `b` (both share one initial state)."""
    fields = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "init":
            fields[f.name] = x
            continue
        fields[f.name] = torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x, y)
    return type(a)(**fields)

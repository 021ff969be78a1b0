"""What every in-context level shares: its projections and rates, its carried state, its use as a layer.

A level runs over a window of tokens: it evaluates its expressions (queries, keys, values, rates) on the
window's input, hands them to its memory op, and returns the read (B, T, heads × d_v). The reference
interpreter calls the same code one token at a time with the per-token oracle op; the chunked runtime calls
it on whole windows with the parallel op. One set of parameters serves both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import RuntimeInputError
from ..expressions import Context, ConvStates, Expression, Reader
from ..ops.memory_maps import windows
from ..ops.sequence_layers import ConvState
from ..plan import LevelPlan

Probe = dict[str, Tensor]


@dataclass
class LevelState:
    """A level instance's state, per batch row: the memory op's state, the histories of the causal
    convolutions in its expressions, and the position of the next token in its document (for rope)."""

    op: Any
    convs: dict[str, ConvStates]
    position: Tensor

    def select(self, rows: Tensor) -> LevelState:
        convs = {
            role: {k: ConvState(c.history.index_select(0, rows)) for k, c in cs.items()}
            for role, cs in self.convs.items()
        }
        return LevelState(self.op.select(rows), convs, self.position.index_select(0, rows))

    @staticmethod
    def cat(states: Sequence[LevelState]) -> LevelState:
        first = states[0]
        convs = {
            role: {k: ConvState(torch.cat([s.convs[role][k].history for s in states])) for k in cs}
            for role, cs in first.convs.items()
        }
        op = type(first.op).cat([s.op for s in states])
        return LevelState(op, convs, torch.cat([s.position for s in states]))

    def detach(self) -> LevelState:
        convs = {role: {k: c.detach() for k, c in cs.items()} for role, cs in self.convs.items()}
        return LevelState(self.op.detach(), convs, self.position)


def where_rows(mask: Tensor, a: LevelState, b: LevelState) -> LevelState:
    """Row r from `a` where mask[r], else from `b`."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    return LevelState.cat([a, b]).select(torch.where(mask, rows, rows + mask.shape[0]))


def op_settings(plan: LevelPlan) -> dict[str, Any]:
    """The settings every parametric memory op shares, with the catalogue's defaults filled in."""
    return {
        "objective": plan.objective or "l2",
        "chunk": plan.chunk,
        "read": plan.read,
        "grad": plan.gradient,
        "truncate_k": plan.truncate_k,
        "optimizer": plan.optimizer or "gd",
        "p": 2.0 if plan.p is None else plan.p,
        "delta": 1.0 if plan.delta is None else plan.delta,
        "steps": 5 if plan.steps is None else plan.steps,
        "lam": 1.0 if plan.lam is None else plan.lam,
        "window": plan.window,
    }


WINDOW = "window"  # the carried history of a windowed objective, kept beside the convolutions' histories
ROLE_KEYS = {"queries": "query", "keys": "key", "values": "value", "targets": "target"}
RATE_WIDTH = {"scalar": lambda heads, dk: 1, "head": lambda heads, dk: heads, "channel": lambda heads, dk: heads * dk}


class Level(nn.Module, ABC):
    """Base of the in-context levels: builds and evaluates the expressions, runs the memory op."""

    def __init__(self, plan: LevelPlan, d: int, instance: str) -> None:
        super().__init__()
        self.plan = plan
        self.instance = instance  # e.g. `memory[0]`: the key of its state and probe
        self.group: dict[str, str] = {}  # the levels it reads -> their instances (set by the model)
        self.watch: Callable[[str, Tensor], None] | None = None  # sees each read: training/faults.py
        heads, dk, dv = plan.heads, plan.d_key, plan.d_value
        widths = {"queries": heads * dk, "keys": heads * dk, "values": heads * dv, "targets": heads * dv}
        # ModuleDict keys must not shadow its methods (`keys`, `values`): one word per role.
        self.exprs = nn.ModuleDict(
            {ROLE_KEYS[role]: Expression(expr, d, widths[role], heads, dk) for role, expr in plan.exprs.items()}
        )
        self.rates = nn.ModuleDict(
            {
                name: Expression(rate.expr, d, RATE_WIDTH[rate.shape](heads, dk), heads, dk)
                for name, rate in plan.rates.items()
            }
        )

    # ---- what each kind provides
    @abstractmethod
    def initial_op_state(self, batch: int, like: Tensor) -> Any:
        """The memory op's state at a document start (θ_{-1})."""

    @abstractmethod
    def run(self, x: dict[str, Tensor], op_state: Any, lengths: Tensor | None, reference: bool) -> tuple[Tensor, Any]:
        """The memory op over a window: the per-token oracle (reference) or the parallel form."""

    # ---- shared
    def init_state(self, batch: int, like: Tensor) -> LevelState:
        expressions: dict[str, Expression] = {**self.exprs, **self.rates}  # type: ignore[dict-item]
        convs = {role: e.initial_conv_states(batch, like) for role, e in expressions.items()}
        if self.plan.window > 1:  # the last c−1 keys and values of a windowed objective (zeros: none yet)
            p = self.plan
            past = (batch, p.heads, p.window - 1)
            convs[WINDOW] = {
                "keys": ConvState(like.new_zeros(*past, p.d_key)),
                "values": ConvState(like.new_zeros(*past, p.d_value)),
            }
        position = torch.zeros(batch, dtype=torch.int64, device=like.device)
        return LevelState(self.initial_op_state(batch, like), convs, position)

    def read_at(self, state: LevelState, value: Tensor, mode: str) -> Tensor:
        """This level's memory applied to value (B, T, heads × d_k) at its `boundary` state, for another
        level's (or its own) generated inputs."""
        raise RuntimeInputError(f"level `{self.plan.name}` ({self.plan.kind}) cannot be read inside an expression")

    def inputs(
        self, h: Tensor, state: LevelState, lengths: Tensor | None, reader: Reader | None = None
    ) -> tuple[dict[str, Tensor], dict[str, ConvStates]]:
        """The level's queries, keys, values (B, H, T, ·) and rates (B, H, T) or (B, H, T, d_k) from h (B, T, d).
        Generated targets (v̂ = M(v)) replace the values the objective compares with."""
        heads, steps = self.plan.heads, h.shape[1]
        positions = state.position[:, None] + torch.arange(steps, device=h.device)
        x: dict[str, Tensor] = {}
        convs: dict[str, ConvStates] = {}
        context = Context(reader)
        for role, key in ROLE_KEYS.items():
            if key in self.exprs:
                value, convs[key] = self.exprs[key](h, positions, state.convs[key], lengths, context)
                context.roles[role] = value
                x[role] = value.unflatten(-1, (heads, -1)).transpose(1, 2)
        if "targets" in x:
            x["values"] = x.pop("targets").detach() if self.plan.stopgrad_targets else x.pop("targets")
        if "queries" not in x:  # a level read with its own input as the query (an MLP memory as a layer)
            x["queries"] = h.unflatten(-1, (heads, -1)).transpose(1, 2)
        if self.plan.window > 1:  # each token's objective sees the stacks of the last c keys and values
            convs[WINDOW] = {}
            for role in ("keys", "values"):
                x[role], history = windows(x[role], state.convs[WINDOW][role].history, lengths)
                convs[WINDOW][role] = ConvState(history)
        for name, expr in self.rates.items():
            value, convs[name] = expr(h, positions, state.convs[name], lengths, context)
            shape = self.plan.rates[name].shape
            rate = value.unflatten(-1, (heads, -1)) if shape == "channel" else value.expand(*h.shape[:-1], heads)
            x[name] = rate.transpose(1, 2)
        return x, convs

    def forward_window(
        self,
        h: Tensor,
        state: LevelState,
        lengths: Tensor | None,
        probe: Probe | None,
        reference: bool,
        prepared: tuple[dict[str, Tensor], dict[str, ConvStates]] | None = None,
    ) -> tuple[Tensor, LevelState]:
        """A window of tokens (B, T, d) -> the level's read (B, T, heads × d_v) and the new state.
        `prepared` inputs come from a group whose reads were all taken before any member updated."""
        x, convs = prepared if prepared is not None else self.inputs(h, state, lengths)
        out, op_state = self.run(x, state.op, lengths, reference)
        used = lengths if lengths is not None else torch.full_like(state.position, h.shape[1])
        if probe is not None:
            probe.update(x, output=out)
        if self.watch is not None:
            self.watch(self.instance, out)
        return out.transpose(1, 2).flatten(-2), LevelState(op_state, convs, state.position + used)

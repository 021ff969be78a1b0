"""A level trained by the task loss itself (`objective task`, NL Eq. 71: the Continuum Memory System).

Its memory is an MLP M(x) = x + [LN](W1 σ(W2 x)) used as a layer and read at the chunk start (boundary).
For its chunk [b, e] it takes g = ∂/∂θ Σ_{t=b}^{e} η_t CE(logits_t, x_{t+1}) at θ = θ_{b−1} and steps once,
θ ← α θ − g (η inside the sum). Each sequence (row) has its own θ and its own g.

How the gradient is taken: every window the level reads through a fresh leaf tensor equal to θ; after the
window's logits exist the scheduler differentiates the window's labelled loss terms with respect to the
leaves and adds the result to the chunk's running gradient G. When the chunk's last token has its label,
θ is updated. A call can end before that label is known: the level is then `due` and the scheduler finishes
the update at the start of the next call, from the logits it kept (DESIGN §3, depth-synchronous schedule).
The outer gradient stops at the updates: θ enters as θ_{−1} + sg(θ − θ_{−1}), so the meta-learned initial
state gets the outer gradient and nothing flows back through the updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.mlp_memory import MLPMemoryConfig
from ..ops.mlp_memory.state import apply_memory, init_rows
from ..plan import LevelPlan
from .base import Level


@dataclass
class LeafRecord:
    """The tensors one window read θ through. `rows` maps the state's rows to the leaves' rows (−1: this
    row has no record), and `chunk` says which chunk each leaf row belonged to, so a gradient is only
    taken for rows still in that chunk."""

    leaf1: Tensor
    leaf2: Tensor
    chunk: Tensor  # (rows of the leaves,)
    rows: Tensor  # (B,) int64

    def gradient(self, loss: Tensor, current_chunk: Tensor) -> tuple[Tensor, Tensor] | None:
        grads = torch.autograd.grad(loss, (self.leaf1, self.leaf2), retain_graph=True, allow_unused=True)
        if grads[0] is None and grads[1] is None:
            return None
        safe = self.rows.clamp(min=0)
        same = (self.rows >= 0) & (self.chunk.index_select(0, safe) == current_chunk)
        out = []
        for grad, leaf in zip(grads, (self.leaf1, self.leaf2)):
            g = torch.zeros_like(leaf) if grad is None else grad
            out.append(torch.where(same.view(-1, 1, 1, 1), g.index_select(0, safe), torch.zeros_like(g[:1])))
        return out[0], out[1]


@dataclass
class TaskState:
    """W1 (B,H,d,h), W2 (B,H,h,d): θ, constant inside a chunk; G1, G2: the chunk's gradient so far;
    phase, chunks_done (B,); due (B,): the chunk is complete but its last token's label is still unknown;
    last_lr (B,): η of each row's last token. `leaves`: every window's read of θ in the current chunks."""

    W1: Tensor
    W2: Tensor
    G1: Tensor
    G2: Tensor
    phase: Tensor
    chunks_done: Tensor
    due: Tensor
    last_lr: Tensor
    leaves: list[LeafRecord] = field(default_factory=list)

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.W1, self.W2, self.G1, self.G2, self.phase, self.chunks_done, self.due, self.last_lr)

    def select(self, rows: Tensor) -> TaskState:
        leaves = [LeafRecord(r.leaf1, r.leaf2, r.chunk, r.rows.index_select(0, rows)) for r in self.leaves]
        return TaskState(*(t.index_select(0, rows) for t in self._tensors()), leaves=leaves)  # type: ignore[arg-type, misc]

    @staticmethod
    def cat(states: Sequence[TaskState]) -> TaskState:
        columns = zip(*(s._tensors() for s in states))
        leaves = []
        for i, state in enumerate(states):
            for record in state.leaves:
                maps = [record.rows if j == i else -torch.ones_like(s.phase) for j, s in enumerate(states)]
                leaves.append(LeafRecord(record.leaf1, record.leaf2, record.chunk, torch.cat(maps)))
        return TaskState(*(torch.cat(list(c)) for c in columns), leaves=leaves)  # type: ignore[arg-type, misc]

    def detach(self) -> TaskState:
        return TaskState(*(t.detach() for t in self._tensors()))  # type: ignore[arg-type, misc]

    def gradient(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        """∂loss/∂θ per row, summed over every read of θ in each row's current chunk."""
        g1, g2 = torch.zeros_like(self.W1), torch.zeros_like(self.W2)
        for record in self.leaves:
            part = record.gradient(loss, self.chunks_done)
            if part is not None:
                g1, g2 = g1 + part[0], g2 + part[1]
        return g1, g2


@dataclass
class TaskRead:
    """What one window of a task level hands the scheduler: the level and its per-token rates."""

    level: TaskLevel
    lr: Tensor  # (B, T): η_t for each token of the window


class TaskLevel(Level):
    def __init__(self, plan: LevelPlan, d: int, instance: str) -> None:
        super().__init__(plan, d, instance)
        heads, dk = plan.heads, plan.d_key
        hidden = int(plan.options.get("expand", 4) * dk)
        self.init2 = nn.Parameter(torch.randn(heads, hidden, dk) / math.sqrt(dk))
        self.init1 = nn.Parameter(torch.randn(heads, dk, hidden) * (0.1 / math.sqrt(hidden)))
        self.config = MLPMemoryConfig(norm=plan.options.get("norm") == "layernorm")
        self.pending: list[TaskRead] | None = None  # set by the scheduler around each window

    def initial_op_state(self, batch: int, like: Tensor) -> TaskState:
        W1, W2 = init_rows(self.init1, batch), init_rows(self.init2, batch)
        zeros = torch.zeros(batch, dtype=torch.int64, device=like.device)
        return TaskState(
            W1,
            W2,
            torch.zeros_like(W1),
            torch.zeros_like(W2),
            zeros,
            zeros.clone(),
            zeros.bool(),
            like.new_zeros(batch),
        )

    def run(self, x: dict[str, Tensor], op_state: Any, lengths: Tensor | None, reference: bool) -> tuple[Tensor, Any]:
        """Read M at θ (the chunk-start state) through fresh leaves that the scheduler differentiates."""
        state: TaskState = op_state
        leaf1 = state.W1.detach().requires_grad_(True)
        leaf2 = state.W2.detach().requires_grad_(True)
        # θ_{-1} + sg(θ − θ_{-1}): the value is θ, the outer gradient reaches only the initial state.
        W1 = leaf1 + (self.init1 - self.init1.detach())
        W2 = leaf2 + (self.init2 - self.init2.detach())
        out = apply_memory(W1, W2, x["queries"], self.config)
        lr = x["lr"].mean(1)  # (B, T)
        if self.pending is not None:
            self.pending.append(TaskRead(self, lr))
        steps = lr.shape[1]
        used = lengths if lengths is not None else torch.full_like(state.phase, steps)
        last = lr.gather(1, (used - 1).clamp(min=0)[:, None])[:, 0].detach()
        rows = torch.arange(state.phase.shape[0], device=lr.device)
        record = LeafRecord(leaf1, leaf2, state.chunks_done, rows)
        return out, replace(state, leaves=[*state.leaves, record], last_lr=torch.where(used > 0, last, state.last_lr))

    def retain(self) -> float:
        expr = self.plan.rates["retain"].expr
        return float(expr["value"]) if expr["op"] == "const" else 1.0

    def accumulate(self, state: TaskState, loss: Tensor) -> TaskState:
        """Add ∂loss/∂θ (this row's θ at its current chunk start) to the chunk's running gradient."""
        g1, g2 = state.gradient(loss)
        return replace(state, G1=state.G1 + g1, G2=state.G2 + g2)

    def advance(self, state: TaskState, used: Tensor, labelled_end: Tensor) -> TaskState:
        """Count `used` tokens per row; rows whose chunk is complete update if its last label was known
        (`labelled_end`), else they become due."""
        phase = state.phase + used
        complete = phase >= self.plan.chunk
        state = replace(state, phase=torch.where(complete, torch.zeros_like(phase), phase))
        return self.update(state, complete & labelled_end, due=complete & ~labelled_end)

    def update(self, state: TaskState, rows: Tensor, due: Tensor | None = None) -> TaskState:
        """θ ← α θ − G on `rows` (one optimizer step per chunk), then a fresh chunk gradient."""
        view = rows.view(-1, 1, 1, 1)
        alpha = self.retain()
        W1 = torch.where(view, alpha * state.W1 - state.G1, state.W1).detach()
        W2 = torch.where(view, alpha * state.W2 - state.G2, state.W2).detach()
        G1 = torch.where(view, torch.zeros_like(state.G1), state.G1)
        G2 = torch.where(view, torch.zeros_like(state.G2), state.G2)
        done = state.chunks_done + rows.long()
        new_due = (state.due & ~rows) | (due if due is not None else torch.zeros_like(rows))
        # Reads of θ from finished chunks no longer matter once no row is still in them.
        leaves = [
            r
            for r in state.leaves
            if bool(((r.rows >= 0) & (r.chunk.index_select(0, r.rows.clamp(min=0)) == done)).any())
        ]
        return TaskState(W1, W2, G1, G2, state.phase, done, new_due, state.last_lr, leaves)

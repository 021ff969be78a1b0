"""A level trained by the task loss itself (`objective task`, NL Eq. 71: the Continuum Memory System).

Its memory is an MLP M(x) = x + [LN](W1 σ(W2 x)) used as a layer and read at the chunk start (boundary).
For its chunk [b, e] it takes g = ∂/∂θ Σ_{t=b}^{e} η_t CE(logits_t, x_{t+1}) at θ = θ_{b−1} and steps once,
θ ← α θ − g (η inside the sum). Each sequence (row) has its own θ and its own g.

How the gradient is taken: every window the level reads through a fresh leaf tensor equal to θ; after the
window's logits exist the scheduler adds the window's labelled loss terms η_t CE_t to the chunk's running
loss. When the chunk's last token has its label, one backward pass differentiates the chunk's loss with
respect to all the chunk's leaves (its reads of θ) and θ is updated. A call can end before that label is
known: the level is then `due` and the scheduler finishes the update at the start of the next call, from
the logits it kept (DESIGN §3, depth-synchronous schedule).
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

    def gather(self, grads: Sequence[Tensor | None], current_chunk: Tensor) -> tuple[Tensor, Tensor]:
        """This record's share of ∂loss/∂θ per state row: the leaves' gradients mapped to the state's rows,
        zero for rows without a record or whose chunk has moved on since the read."""
        safe = self.rows.clamp(min=0)
        same = (self.rows >= 0) & (self.chunk.index_select(0, safe) == current_chunk)
        # The common case, every row reading its own leaf row in the same chunk, needs no copies.
        direct = self.leaf1.shape[0] == safe.shape[0] and bool(same.all()) and bool((safe == self._arange()).all())
        out = []
        for grad, leaf in zip(grads, (self.leaf1, self.leaf2)):
            g = torch.zeros_like(leaf) if grad is None else grad
            if direct:
                out.append(g)
            else:
                out.append(torch.where(same.view(-1, 1, 1, 1), g.index_select(0, safe), torch.zeros_like(g[:1])))
        return out[0], out[1]

    def _arange(self) -> Tensor:
        return torch.arange(self.rows.shape[0], device=self.rows.device)


@dataclass
class TaskState:
    """W1 (B,H,d,h), W2 (B,H,h,d): θ, constant inside a chunk; G1, G2: gradient already taken in the
    current chunk (only when a stream was detached mid-chunk); phase, chunks_done (B,); due (B,): the chunk
    is complete but its last token's label is still unknown; last_lr (B,): η of each row's last token.
    `leaves`: every window's read of θ in the current chunks; `loss` (B,): Σ η_t CE_t of each row's current
    chunk so far, with its graph (None: no terms yet)."""

    W1: Tensor
    W2: Tensor
    G1: Tensor
    G2: Tensor
    phase: Tensor
    chunks_done: Tensor
    due: Tensor
    last_lr: Tensor
    leaves: list[LeafRecord] = field(default_factory=list)
    loss: Tensor | None = None

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.W1, self.W2, self.G1, self.G2, self.phase, self.chunks_done, self.due, self.last_lr)

    def select(self, rows: Tensor) -> TaskState:
        leaves = [LeafRecord(r.leaf1, r.leaf2, r.chunk, r.rows.index_select(0, rows)) for r in self.leaves]
        loss = None if self.loss is None else self.loss.index_select(0, rows)
        return TaskState(*(t.index_select(0, rows) for t in self._tensors()), leaves=leaves, loss=loss)  # type: ignore[arg-type, misc]

    @staticmethod
    def cat(states: Sequence[TaskState]) -> TaskState:
        columns = zip(*(s._tensors() for s in states))
        leaves = []
        for i, state in enumerate(states):
            for record in state.leaves:
                maps = [record.rows if j == i else -torch.ones_like(s.phase) for j, s in enumerate(states)]
                leaves.append(LeafRecord(record.leaf1, record.leaf2, record.chunk, torch.cat(maps)))
        losses = [s.loss if s.loss is not None else s.last_lr.new_zeros(s.last_lr.shape) for s in states]
        loss = None if all(s.loss is None for s in states) else torch.cat(losses)
        return TaskState(*(torch.cat(list(c)) for c in columns), leaves=leaves, loss=loss)  # type: ignore[arg-type, misc]

    def detach(self) -> TaskState:
        """Cut the graph between calls: the gradient of the chunk so far is taken now and kept in G."""
        (state,) = settle_gradients([(self, torch.ones_like(self.due))])
        return TaskState(*(t.detach() for t in state._tensors()))  # type: ignore[arg-type, misc]

    def leaf_tensors(self) -> list[Tensor]:
        return [leaf for record in self.leaves for leaf in (record.leaf1, record.leaf2)]

    def with_gradient(self, grads: Sequence[Tensor | None]) -> TaskState:
        """Add ∂loss/∂θ, given the gradients of `leaf_tensors()` in order, to the chunk's running gradient."""
        g1, g2 = self.G1, self.G2
        for i, record in enumerate(self.leaves):
            part1, part2 = record.gather(grads[2 * i : 2 * i + 2], self.chunks_done)
            g1, g2 = g1 + part1, g2 + part2
        return replace(self, G1=g1, G2=g2)


def settle_gradients(items: Sequence[tuple[TaskState, Tensor]]) -> list[TaskState]:
    """For each (state, rows): G += ∂(Σ_rows loss)/∂θ, summed over every read of θ in each row's current
    chunk, and those rows' loss terms are cleared.

    The gradient of a chunk is taken once, when the chunk ends: one backward pass over the chunk's span
    instead of one per window. States that share one loss tensor (levels with the same constant rate and the
    same chunks, as in the layers of a CMS) and the same rows share one pass over all their leaves."""
    groups: dict[tuple[int, bytes], list[int]] = {}
    for index, (state, rows) in enumerate(items):
        if state.loss is not None and bool(rows.any()):
            groups.setdefault((id(state.loss), rows.cpu().numpy().tobytes()), []).append(index)
    out = [state for state, _ in items]
    for indices in groups.values():
        state, rows = items[indices[0]]
        assert state.loss is not None
        loss = (state.loss * rows).sum()
        inputs = [leaf for i in indices for leaf in items[i][0].leaf_tensors()]
        grads: Sequence[Tensor | None] = ()
        if inputs and loss.requires_grad:
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        offset = 0
        for i in indices:
            count = 2 * len(items[i][0].leaves)
            settled = items[i][0].with_gradient(grads[offset : offset + count]) if grads else items[i][0]
            offset += count
            out[i] = replace(settled, loss=None if bool(rows.all()) else torch.where(rows, 0.0, state.loss))
    return out


def add_loss_terms(states: Sequence[TaskState], terms: Sequence[Tensor]) -> list[TaskState]:
    """loss += term for each (state, term) pair. Pairs with the same running loss and the same term object
    get the same new tensor, so levels that were sharing a loss keep sharing it."""
    made: dict[tuple[int, int], Tensor] = {}
    out = []
    for state, term in zip(states, terms):
        key = (id(state.loss), id(term))
        if key not in made:
            made[key] = term if state.loss is None else state.loss + term
        out.append(replace(state, loss=made[key]))
    return out


def _fresh_leaf(value: Tensor, anchor: Tensor) -> Tensor:
    """A tensor equal to `value` that the chunk's backward pass differentiates, placed in the graph after
    `anchor` (this window's input) so that the pass does not walk the whole call's history.

    Why not a plain leaf: `torch.autograd.grad` walks every node reachable from the loss unless its inputs
    sit deep in the graph; it skips nodes whose topological number (longest path to a leaf) is below the
    inputs'. A leaf's is 0, so every chunk-end pass walked all earlier windows and a call cost O(T²):
    HOPE, 2 x 1024 tokens, fwd+bwd 42.9 s; anchored 14.2 s (8 x 256: 5.9 → 5.3 s). The anchor gets no
    gradient, so values and gradients are unchanged."""
    return _AnchoredLeaf.apply(value.detach().requires_grad_(True), anchor)


class _AnchoredLeaf(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, leaf: Tensor, anchor: Tensor) -> Tensor:
        return leaf.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


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
        self.config = MLPMemoryConfig(
            norm=plan.options.get("norm") == "layernorm", activation=plan.options.get("activation", "silu")
        )
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
        leaf1, leaf2 = (_fresh_leaf(w, x["queries"]) for w in (state.W1, state.W2))
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

    def advance(self, state: TaskState, used: Tensor, labelled_end: Tensor) -> tuple[TaskState, Tensor, Tensor]:
        """Count `used` tokens per row. Returns the state and two row masks: the rows whose chunk is
        complete with its last label known (update now), and those still waiting for that label (due)."""
        phase = state.phase + used
        complete = phase >= self.plan.chunk
        state = replace(state, phase=torch.where(complete, torch.zeros_like(phase), phase))
        return state, complete & labelled_end, complete & ~labelled_end

    def update(self, state: TaskState, rows: Tensor, due: Tensor | None = None) -> TaskState:
        """θ ← α θ − G on `rows` (one optimizer step per chunk), then a fresh chunk gradient. `rows` must
        have been settled (`settle_gradients`) first, so that G holds the whole chunk's gradient."""
        if not bool(rows.any()):  # most windows end no chunk: nothing to step, nothing to forget
            return replace(state, due=state.due | due) if due is not None else state
        view = rows.view(-1, 1, 1, 1)
        alpha = self.retain()
        if bool(rows.all()):  # rows of a batch usually end their chunks together: no masked copies
            W1 = (alpha * state.W1 - state.G1).detach()
            W2 = (alpha * state.W2 - state.G2).detach()
            G1, G2 = torch.zeros_like(state.G1), torch.zeros_like(state.G2)
        else:
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
        return TaskState(W1, W2, G1, G2, state.phase, done, new_due, state.last_lr, leaves, state.loss)

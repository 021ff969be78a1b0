"""A level trained by the task loss itself (`objective task`, NL Eq. 71: the Continuum Memory System).

Its memory is an MLP M(x) = x + [LN](W1 σ(W2 x)) used as a layer and read at the chunk start (boundary).
For its chunk [b, e] it takes g = ∂/∂θ Σ_{t=b}^{e} η_t CE(logits_t, x_{t+1}) at θ = θ_{b−1} and steps once,
θ ← α θ − g (η inside the sum). Each sequence (row) has its own θ and its own g.

How the gradient is taken: every window the level reads M_θ(x) and keeps a record of the read (its
queries and outputs); after the window's logits exist the scheduler adds the window's labelled loss terms
η_t CE_t to the chunk's running loss. When the chunk's last token has its label, one backward pass gives
∂loss/∂output for every read of the chunk, and since θ enters the loss only through those reads, one
written-out product over all the chunk's tokens pulls them back to ∂loss/∂θ; θ is updated. (Differentiating
with respect to θ itself would make autograd build a (B, H, d, h) gradient per window and add them up: more
than half of a HOPE training step.) A call can end before the last label is known: the level is then
`due` and the scheduler finishes the update at the start of the next call, from the logits it kept
(DESIGN §3, depth-synchronous schedule).
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
from ..ops.mlp_memory.state import apply_memory, apply_memory_backward, init_rows
from ..plan import LevelPlan
from .base import Level


@dataclass
class ReadRecord:
    """One window's read of θ: its queries (without graph) and its outputs M_θ(x) (with the graph the chunk's
    loss is differentiated through). `rows` maps the state's rows to the record's rows (−1: this row has no
    record), and `chunk` says which chunk each record row belonged to, so a gradient is only taken for rows
    still in that chunk."""

    queries: Tensor  # (rows of the record, H, T, d)
    output: Tensor  # (rows of the record, H, T, d)
    chunk: Tensor  # (rows of the record,)
    rows: Tensor  # (B,) int64
    config: MLPMemoryConfig

    def gather(self, grad: Tensor, current_chunk: Tensor) -> tuple[Tensor, Tensor]:
        """This record's queries and ∂loss/∂output mapped to the state's rows, the gradient zero for rows
        without a record or whose chunk has moved on since the read."""
        safe = self.rows.clamp(min=0)
        same = (self.rows >= 0) & (self.chunk.index_select(0, safe) == current_chunk)
        # The common case, every row reading its own record row in the same chunk, needs no copies.
        if self.output.shape[0] == safe.shape[0] and bool(same.all()) and bool((safe == self._arange()).all()):
            return self.queries, grad
        mapped = torch.where(same.view(-1, 1, 1, 1), grad.index_select(0, safe), torch.zeros_like(grad[:1]))
        return self.queries.index_select(0, safe), mapped

    def _arange(self) -> Tensor:
        return torch.arange(self.rows.shape[0], device=self.rows.device)


@dataclass
class TaskState:
    """W1 (B,H,d,h), W2 (B,H,h,d): θ, constant inside a chunk; G1, G2: gradient already taken in the
    current chunk (only when a stream was detached mid-chunk); phase, chunks_done (B,); due (B,): the chunk
    is complete but its last token's label is still unknown; last_lr (B,): η of each row's last token.
    `reads`: every window's read of θ in the current chunks; `loss` (B,): Σ η_t CE_t of each row's current
    chunk so far, with its graph (None: no terms yet)."""

    W1: Tensor
    W2: Tensor
    G1: Tensor
    G2: Tensor
    phase: Tensor
    chunks_done: Tensor
    due: Tensor
    last_lr: Tensor
    reads: list[ReadRecord] = field(default_factory=list)
    loss: Tensor | None = None

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.W1, self.W2, self.G1, self.G2, self.phase, self.chunks_done, self.due, self.last_lr)

    def select(self, rows: Tensor) -> TaskState:
        reads = [replace(r, rows=r.rows.index_select(0, rows)) for r in self.reads]
        loss = None if self.loss is None else self.loss.index_select(0, rows)
        return TaskState(*(t.index_select(0, rows) for t in self._tensors()), reads=reads, loss=loss)  # type: ignore[arg-type, misc]

    @staticmethod
    def cat(states: Sequence[TaskState]) -> TaskState:
        columns = zip(*(s._tensors() for s in states))
        reads = []
        for i, state in enumerate(states):
            for record in state.reads:
                maps = [record.rows if j == i else -torch.ones_like(s.phase) for j, s in enumerate(states)]
                reads.append(replace(record, rows=torch.cat(maps)))
        losses = [s.loss if s.loss is not None else s.last_lr.new_zeros(s.last_lr.shape) for s in states]
        loss = None if all(s.loss is None for s in states) else torch.cat(losses)
        return TaskState(*(torch.cat(list(c)) for c in columns), reads=reads, loss=loss)  # type: ignore[arg-type, misc]

    def detach(self) -> TaskState:
        """Cut the graph between calls: the gradient of the chunk so far is taken now and kept in G."""
        (state,) = settle_gradients([(self, torch.ones_like(self.due))])
        return TaskState(*(t.detach() for t in state._tensors()))  # type: ignore[arg-type, misc]

    def read_outputs(self) -> list[Tensor]:
        return [record.output for record in self.reads]

    def with_gradient(self, grads: Sequence[Tensor | None]) -> TaskState:
        """Add ∂loss/∂θ to the chunk's running gradient, given ∂loss/∂output of each read (`read_outputs()`
        order): one product over the tokens of all the reads, at θ (constant inside a chunk)."""
        pairs = [record.gather(grad, self.chunks_done) for record, grad in zip(self.reads, grads) if grad is not None]
        if not pairs:
            return self
        queries, d_out = (torch.cat(parts, 2) for parts in zip(*pairs))
        _, delta, s, u = apply_memory_backward(self.W1, self.W2, queries, d_out, self.reads[0].config)
        g1 = self.G1 + delta.transpose(-1, -2) @ s
        g2 = self.G2 + u.transpose(-1, -2) @ queries
        return replace(self, G1=g1, G2=g2)


def settle_gradients(items: Sequence[tuple[TaskState, Tensor]]) -> list[TaskState]:
    """For each (state, rows): G += ∂(Σ_rows loss)/∂θ, summed over every read of θ in each row's current
    chunk, and those rows' loss terms are cleared.

    The gradient of a chunk is taken once, when the chunk ends: one backward pass over the chunk's span
    instead of one per window. States that share one loss tensor (levels with the same constant rate and the
    same chunks, as in the layers of a CMS) and the same rows share one pass over all their reads."""
    groups: dict[tuple[int, bytes], list[int]] = {}
    for index, (state, rows) in enumerate(items):
        if state.loss is not None and bool(rows.any()):
            groups.setdefault((id(state.loss), rows.cpu().numpy().tobytes()), []).append(index)
    out = [state for state, _ in items]
    for indices in groups.values():
        state, rows = items[indices[0]]
        assert state.loss is not None
        loss = (state.loss * rows).sum()
        inputs = [output for i in indices for output in items[i][0].read_outputs()]
        grads: Sequence[Tensor | None] = ()
        if inputs and loss.requires_grad:
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        offset = 0
        for i in indices:
            count = len(items[i][0].reads)
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


class _MemoryRead(torch.autograd.Function):
    """M_θ(x) with θ = θ_{−1} + sg(θ − θ_{−1}): gradients reach x and the initial state θ_{−1}, never the
    state rows (B, H, d, h), so no per-row weight gradient is built. The chunk-end pass takes ∂loss/∂M_θ(x)
    at this node's output; the outer backward comes here.

    The output's graph starts after x, deep in the call's graph: `torch.autograd.grad` then skips every node
    of a lower topological number, so a chunk-end pass does not walk the whole call so far (a read through a
    plain leaf made a call O(T²): HOPE, 2 x 1024 tokens, fwd+bwd 42.9 s against 14.2 s)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, W1: Tensor, W2: Tensor, init1: Tensor, init2: Tensor, config: MLPMemoryConfig
    ) -> Tensor:
        ctx.save_for_backward(x, W1, W2)
        ctx.config = config
        return apply_memory(W1, W2, x, config)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W1, W2 = ctx.saved_tensors
        dx, delta, s, u = apply_memory_backward(W1, W2, x, d_out, ctx.config)
        # The initial state's gradient sums every row and token in one product per head.
        d_init1 = torch.einsum("bhtd,bhtk->hdk", delta, s) if ctx.needs_input_grad[3] else None
        d_init2 = torch.einsum("bhtk,bhtd->hkd", u, x) if ctx.needs_input_grad[4] else None
        return dx if ctx.needs_input_grad[0] else None, None, None, d_init1, d_init2, None


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
        """Read M at θ (the chunk-start state); the record of the read is what the scheduler differentiates."""
        state: TaskState = op_state
        queries = x["queries"]
        out = _MemoryRead.apply(queries, state.W1.detach(), state.W2.detach(), self.init1, self.init2, self.config)
        if not out.requires_grad:  # nothing before the read is trained: the chunk still needs its gradient
            out = out.requires_grad_(True)
        lr = x["lr"].mean(1)  # (B, T)
        if self.pending is not None:
            self.pending.append(TaskRead(self, lr))
        steps = lr.shape[1]
        used = lengths if lengths is not None else torch.full_like(state.phase, steps)
        last = lr.gather(1, (used - 1).clamp(min=0)[:, None])[:, 0].detach()
        rows = torch.arange(state.phase.shape[0], device=lr.device)
        record = ReadRecord(queries.detach(), out, state.chunks_done, rows, self.config)
        return out, replace(state, reads=[*state.reads, record], last_lr=torch.where(used > 0, last, state.last_lr))

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
        reads = [
            r
            for r in state.reads
            if bool(((r.rows >= 0) & (r.chunk.index_select(0, r.rows.clamp(min=0)) == done)).any())
        ]
        return TaskState(W1, W2, G1, G2, state.phase, done, new_due, state.last_lr, reads, state.loss)

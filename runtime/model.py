"""A compiled system as an `nn.Module`: builds the layers of a plan and schedules them.

Two backends share one set of parameters:
- `reference`: the oracle of DESIGN §3, one token at a time through the whole model, each level with its
  per-token op.
- `chunked`: the fast path, whole windows through each layer in turn, each level with its parallel op.

Documents: a token after the end-of-document id, or a `doc_start` mask, starts a new document and every
in-context level returns to its initial state. The chunked backend does this by repacking a packed batch
into one row per document (each with its own chunk phase), so the memory ops never see a reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RuntimeInputError
from .layers import LAYERS
from .levels import LEVELS, Level, LevelState, Probe, where_rows
from .ops.sequence_layers import STATELESS_LAYERS
from .plan import LayerPlan, Plan

BACKENDS = ("reference", "chunked", "auto")
States = dict[str, LevelState]


@dataclass
class ModelState:
    """What a stream carries between calls: every level instance's state, per row."""

    memories: States
    last_was_eod: Tensor  # (B,) bool: the previous call ended a document

    def detach(self) -> ModelState:
        return ModelState({k: v.detach() for k, v in self.memories.items()}, self.last_was_eod)


class Residual(nn.Module):
    """`residual(body)`: x + body(x)."""

    def __init__(self, body: list[nn.Module]) -> None:
        super().__init__()
        self.body = nn.ModuleList(body)


class Gated(nn.Module):
    """`a * gate(b)`: a(x) ⊙ sigmoid(W b(x)) (an empty `a` is the identity)."""

    def __init__(self, body: list[nn.Module], gate: list[nn.Module], d: int) -> None:
        super().__init__()
        self.body = nn.ModuleList(body)
        self.gate = nn.ModuleList(gate)
        self.proj = nn.Linear(d, d, bias=False)


class Parallel(nn.Module):
    """`a + b`: the branches see the same input; their outputs are summed."""

    def __init__(self, branches: list[list[nn.Module]]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.ModuleList(b) for b in branches])


@dataclass
class _Window:
    """How one window runs: which op form, which rows are padding, where probes go."""

    reference: bool
    lengths: Tensor | None
    probes: dict[str, Probe] | None


class CompiledModel(nn.Module):
    def __init__(self, plan: Plan, backend: str = "auto") -> None:
        super().__init__()
        self.plan = plan
        self.levels: dict[str, Level] = {}
        self.layers = nn.ModuleList([self._build(layer) for layer in plan.layers])
        self.backend = backend

    # ---- construction
    def _build(self, layer: LayerPlan) -> nn.Module:
        d, vocab = self.plan.d, self.plan.vocab
        if layer.op == "residual":
            return Residual([self._build(b) for b in layer.body])
        if layer.op == "gate":
            return Gated([self._build(b) for b in layer.body], [self._build(b) for b in layer.branches[0]], d)
        if layer.op == "parallel":
            return Parallel([[self._build(b) for b in branch] for branch in layer.branches])
        if layer.op == "memory":
            assert layer.level is not None
            level_plan = self.plan.levels[layer.level]
            module = LEVELS[level_plan.kind](level_plan, d, layer.name)
            self.levels[layer.name] = module
            return module
        factory = LAYERS.get(layer.op) or STATELESS_LAYERS[layer.op]
        return factory(d, vocab)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise RuntimeInputError(f"unknown backend {value!r}", hint=f"choose one of {', '.join(BACKENDS)}")
        self._backend = "chunked" if value == "auto" else value

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The outer optimizer levels with the parameters each trains (exclusive: rule 3 of DESIGN §3).

        A level's projections go to the optimizer level that owns it (`level memory in pretrain`); every
        other parameter goes to the default owner, the outermost `every step` level."""
        params: dict[str, list[nn.Parameter]] = {o.name: [] for o in self.plan.optimizers}
        owner_of = {lv: o.name for o in self.plan.optimizers for lv in o.owns_levels}
        default = next((o.name for o in self.plan.optimizers if o.default), None)
        claimed: set[int] = set()
        for level in self.levels.values():
            group = owner_of.get(level.plan.name, default)
            for p in level.parameters():
                if group is not None and id(p) not in claimed:
                    params[group].append(p)
                    claimed.add(id(p))
        for p in self.parameters():
            if id(p) not in claimed and default is not None:
                params[default].append(p)
        return [
            {"name": o.name, "kind": o.kind, "params": params[o.name], **o.hyper}
            for o in self.plan.optimizers
            if params[o.name]
        ]

    def init_state(self, batch: int) -> ModelState:
        like = next(self.parameters())
        memories = {name: level.init_state(batch, like) for name, level in self.levels.items()}
        return ModelState(memories, torch.zeros(batch, dtype=torch.bool, device=like.device))

    # ---- the call
    def forward(
        self,
        tokens: Tensor,
        state: ModelState | None = None,
        *,
        doc_start: Tensor | None = None,
        final: bool = False,
        probe: bool = False,
    ) -> Any:
        """Without a state: a whole sequence, returns logits (B, T, V). With a state: continues a stream and
        returns (logits, state). `final=True` ends the stream (the per-token state is already flushed, so it
        changes nothing for these levels). With `probe=True` a dict of per-level tensors comes last."""
        streaming = state is not None
        if tokens.dim() != 2:
            raise RuntimeInputError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        batch = tokens.shape[0]
        current = state if state is not None else self.init_state(batch)
        starts = self._doc_starts(tokens, current, doc_start, streaming)
        run = self._reference if self.backend == "reference" else self._chunked
        logits, memories, probes = run(tokens, current.memories, starts, probe)
        new_state = ModelState(memories, tokens[:, -1] == self.plan.eod)
        result: tuple[Any, ...] = (logits, new_state) if streaming else (logits,)
        if probe:
            result = (*result, probes)
        return result if len(result) > 1 else result[0]

    def _doc_starts(self, tokens: Tensor, state: ModelState, doc_start: Tensor | None, streaming: bool) -> Tensor:
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[:, 1:] = tokens[:, :-1] == self.plan.eod
        starts[:, 0] = state.last_was_eod if streaming else True
        if doc_start is not None:
            if doc_start.shape != tokens.shape:
                raise RuntimeInputError(f"doc_start has shape {tuple(doc_start.shape)}, tokens {tuple(tokens.shape)}")
            starts |= doc_start.bool()
        return starts

    # ---- the reference interpreter: one token at a time through the whole model
    def _reference(
        self, tokens: Tensor, memories: States, starts: Tensor, probe: bool
    ) -> tuple[Tensor, States, dict[str, Probe]]:
        batch, length = tokens.shape
        fresh = self.init_state(batch).memories
        mem = dict(memories)
        outputs, steps = [], []
        for t in range(length):
            reset = starts[:, t]
            if reset.any():
                mem = {name: where_rows(reset, fresh[name], s) for name, s in mem.items()}
            window = _Window(True, None, {name: {} for name in self.levels} if probe else None)
            outputs.append(self._run(self.layers, tokens[:, t : t + 1], mem, window))
            steps.append(window.probes)
        return torch.cat(outputs, 1), mem, _merge_probes(steps)

    # ---- the chunked runtime: whole windows through each layer
    def _chunked(
        self, tokens: Tensor, memories: States, starts: Tensor, probe: bool
    ) -> tuple[Tensor, States, dict[str, Probe]]:
        batch = tokens.shape[0]
        fresh = self.init_state(batch).memories
        if not starts[:, 1:].any():  # one document per row: no repacking needed
            mem = {name: where_rows(starts[:, 0], fresh[name], s) for name, s in memories.items()}
            return self._windows(tokens, mem, None, probe)
        docs = _Documents(starts)
        seg_fresh = self.init_state(docs.count).memories
        mem = {name: where_rows(docs.carries, s.select(docs.row), seg_fresh[name]) for name, s in memories.items()}
        logits, mem, probes = self._windows(docs.pack(tokens), mem, docs.length, probe)
        probes = {
            name: {k: docs.unpack(v.transpose(1, 2)).transpose(1, 2) for k, v in p.items()}
            for name, p in probes.items()
        }
        return docs.unpack(logits), {n: s.select(docs.last) for n, s in mem.items()}, probes

    def _windows(
        self, tokens: Tensor, mem: States, lengths: Tensor | None, probe: bool
    ) -> tuple[Tensor, States, dict[str, Probe]]:
        """The scheduler: advance the whole model one window at a time (all layers per window)."""
        length = tokens.shape[1]
        size = self.plan.window or length
        outputs, probes = [], []
        for start in range(0, length, size):
            stop = min(start + size, length)
            lens = None if lengths is None else (lengths - start).clamp(0, stop - start)
            window = _Window(False, lens, {name: {} for name in self.levels} if probe else None)
            outputs.append(self._run(self.layers, tokens[:, start:stop], mem, window))
            probes.append(window.probes)
        return torch.cat(outputs, 1), mem, _merge_probes(probes)

    def _run(self, layers: nn.ModuleList, h: Tensor, mem: States, window: _Window) -> Tensor:
        """Apply `layers` to a window h (B, T, ·), advancing the level states in `mem`."""
        for layer in layers:
            if isinstance(layer, Residual):
                h = h + self._run(layer.body, h, mem, window)
            elif isinstance(layer, Gated):
                value = self._run(layer.body, h, mem, window)
                h = value * torch.sigmoid(layer.proj(self._run(layer.gate, h, mem, window)))
            elif isinstance(layer, Parallel):
                branches: list[nn.ModuleList] = list(layer.branches)  # type: ignore[arg-type]
                h = sum((self._run(branch, h, mem, window) for branch in branches), torch.zeros_like(h))
            elif isinstance(layer, Level):
                probe = window.probes.get(layer.instance) if window.probes is not None else None
                h, mem[layer.instance] = layer.forward_window(
                    h, mem[layer.instance], window.lengths, probe, window.reference
                )
            else:
                h = layer(h)
        return h


def _merge_probes(windows: list[dict[str, Probe] | None]) -> dict[str, Probe]:
    present = [w for w in windows if w is not None]
    if not present:
        return {}
    return {name: {k: torch.cat([w[name][k] for w in present], 2) for k in present[0][name]} for name in present[0]}


class _Documents:
    """The documents of a packed batch as rows of their own: (row, start, length) per document."""

    def __init__(self, starts: Tensor) -> None:
        bounds = starts.clone()
        bounds[:, 0] = True
        self.batch, self.time = starts.shape
        self.row, self.start = bounds.nonzero(as_tuple=True)
        same_row = torch.zeros_like(self.row, dtype=torch.bool)
        same_row[:-1] = self.row[1:] == self.row[:-1]
        next_start = torch.cat([self.start[1:], self.start.new_tensor([self.time])])
        self.length = torch.where(same_row, next_start, self.time) - self.start
        self.last = (~same_row).nonzero(as_tuple=True)[0]  # each row's last document, in row order
        self.carries = (self.start == 0) & ~starts[self.row, 0]  # continues the row's stream
        self.count = int(self.row.numel())
        width = int(self.length.max())
        offsets = torch.arange(width, device=starts.device)
        self.valid = offsets[None, :] < self.length[:, None]
        self.src_t = (self.start[:, None] + offsets[None, :]).clamp(max=self.time - 1)

    def pack(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (documents, longest, ...), padding with zeros."""
        packed = x[self.row[:, None], self.src_t]
        mask = self.valid.view(*self.valid.shape, *([1] * (packed.dim() - 2)))
        return packed * mask.to(packed.dtype)

    def unpack(self, y: Tensor) -> Tensor:
        """(documents, longest, ...) -> (B, T, ...)."""
        out = y.new_zeros(self.batch, self.time, *y.shape[2:])
        n, j = self.valid.nonzero(as_tuple=True)
        out[self.row[n], self.start[n] + j] = y[n, j]
        return out

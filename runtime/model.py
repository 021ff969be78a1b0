"""A compiled system as an `nn.Module`: builds the layers of a plan and schedules them.

Two backends share one set of parameters:
- `reference`: the oracle of DESIGN §3, one token at a time through the whole model.
- `chunked`: the fast path, whole windows through each layer in turn, the memory op in parallel blocks.

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
from .memory_layer import MemoryLayer, Probe, take_rows, where_rows
from .ops.matrix_memory import MatrixMemoryState
from .plan import LayerPlan, Plan

BACKENDS = ("reference", "chunked", "auto")


@dataclass
class ModelState:
    """What a stream carries between calls: every level instance's memory state, per row."""

    memories: dict[str, MatrixMemoryState]
    last_was_eod: Tensor  # (B,) bool: the previous call ended a document

    def detach(self) -> ModelState:
        return ModelState({k: v.detach() for k, v in self.memories.items()}, self.last_was_eod)


class Residual(nn.Module):
    """`residual(body)`: x + body(x)."""

    def __init__(self, body: list[nn.Module]) -> None:
        super().__init__()
        self.body = nn.ModuleList(body)


class CompiledModel(nn.Module):
    def __init__(self, plan: Plan, backend: str = "auto") -> None:
        super().__init__()
        self.plan = plan
        self.memory_layers: dict[str, MemoryLayer] = {}
        self.layers = nn.ModuleList([self._build(layer) for layer in plan.layers])
        self.backend = backend

    # ---- construction
    def _build(self, layer: LayerPlan) -> nn.Module:
        if layer.op == "residual":
            return Residual([self._build(b) for b in layer.body])
        if layer.op == "memory":
            assert layer.level is not None
            module = MemoryLayer(self.plan.levels[layer.level], self.plan.d, instance=layer.name)
            self.memory_layers[layer.name] = module
            return module
        return LAYERS[layer.op](self.plan.d, self.plan.vocab)

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
        for layer in self.memory_layers.values():
            group = owner_of.get(layer.plan.name, default)
            for p in layer.parameters():
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
        memories = {name: layer.init_state(batch, like) for name, layer in self.memory_layers.items()}
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
        changes nothing for matrix memories). With `probe=True` a dict of per-level tensors comes last."""
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
        self, tokens: Tensor, memories: dict[str, MatrixMemoryState], starts: Tensor, probe: bool
    ) -> tuple[Tensor, dict[str, MatrixMemoryState], dict[str, Probe]]:
        batch, length = tokens.shape
        fresh = self.init_state(batch).memories
        mem = dict(memories)
        steps: dict[str, list[Probe]] = {name: [] for name in self.memory_layers}
        outputs = []
        for t in range(length):
            reset = starts[:, t]
            if reset.any():
                mem = {name: where_rows(reset, fresh[name], s) for name, s in mem.items()}
            outputs.append(self._step(self.layers, tokens[:, t], mem, steps if probe else None))
        probes = {name: {k: torch.stack([p[k] for p in ps], 2) for k in ps[0]} for name, ps in steps.items() if ps}
        return torch.stack(outputs, 1), mem, probes

    def _step(
        self, layers: nn.ModuleList, h: Tensor, mem: dict[str, MatrixMemoryState], steps: dict[str, list[Probe]] | None
    ) -> Tensor:
        for layer in layers:
            if isinstance(layer, Residual):
                h = h + self._step(layer.body, h, mem, steps)
            elif isinstance(layer, MemoryLayer):
                name = layer.instance
                h, mem[name] = layer.step(h, mem[name], None, steps[name] if steps is not None else None)
            else:
                h = layer(h)
        return h

    # ---- the chunked runtime: whole windows through each layer
    def _chunked(
        self, tokens: Tensor, memories: dict[str, MatrixMemoryState], starts: Tensor, probe: bool
    ) -> tuple[Tensor, dict[str, MatrixMemoryState], dict[str, Probe]]:
        batch = tokens.shape[0]
        fresh = self.init_state(batch).memories
        if not starts[:, 1:].any():  # one document per row: no repacking needed
            mem = {name: where_rows(starts[:, 0], fresh[name], s) for name, s in memories.items()}
            return self._windows(tokens, mem, None, probe)
        docs = _Documents(starts)
        seg_fresh = self.init_state(docs.count).memories
        mem = {name: where_rows(docs.carries, take_rows(s, docs.row), seg_fresh[name]) for name, s in memories.items()}
        logits, mem, probes = self._windows(docs.pack(tokens), mem, docs.length, probe)
        probes = {
            name: {k: docs.unpack(v.transpose(1, 2)).transpose(1, 2) for k, v in p.items()}
            for name, p in probes.items()
        }
        return docs.unpack(logits), {n: take_rows(s, docs.last) for n, s in mem.items()}, probes

    def _windows(
        self, tokens: Tensor, mem: dict[str, MatrixMemoryState], lengths: Tensor | None, probe: bool
    ) -> tuple[Tensor, dict[str, MatrixMemoryState], dict[str, Probe]]:
        """The scheduler: advance the whole model one window at a time (all layers per window)."""
        length = tokens.shape[1]
        window = self.plan.window or length
        outputs, window_probes = [], []
        for start in range(0, length, window):
            stop = min(start + window, length)
            lens = None if lengths is None else (lengths - start).clamp(0, stop - start)
            probes: dict[str, Probe] = {name: {} for name in self.memory_layers} if probe else {}
            h = self._seq(self.layers, tokens[:, start:stop], mem, lens, probes)
            outputs.append(h)
            window_probes.append(probes)
        merged = {
            name: {k: torch.cat([p[name][k] for p in window_probes], 2) for k in window_probes[0][name]}
            for name in (window_probes[0] if probe else {})
        }
        return torch.cat(outputs, 1), mem, merged

    def _seq(
        self,
        layers: nn.ModuleList,
        h: Tensor,
        mem: dict[str, MatrixMemoryState],
        lengths: Tensor | None,
        probes: dict[str, Probe],
    ) -> Tensor:
        for layer in layers:
            if isinstance(layer, Residual):
                h = h + self._seq(layer.body, h, mem, lengths, probes)
            elif isinstance(layer, MemoryLayer):
                name = layer.instance
                h, mem[name] = layer.forward_seq(h, mem[name], lengths, probes.get(name))
            else:
                h = layer(h)
        return h


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

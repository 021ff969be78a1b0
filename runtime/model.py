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

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import RuntimeInputError
from .layers import LAYERS
from .levels import Level, LevelState, Probe, level_class, where_rows
from .levels.task import TaskLevel, TaskRead, TaskState, add_loss_terms, settle_gradients
from .ops.matrix_memory.triton import resolve_backend
from .ops.sequence_layers import STATELESS_LAYERS
from .plan import LayerPlan, Plan

BACKENDS = ("reference", "chunked", "triton", "auto")
States = dict[str, LevelState]


@dataclass
class ModelState:
    """What a stream carries between calls: every level instance's state, per row, and (for levels with
    `objective task`) the last token's logits, whose label only the next call brings."""

    memories: States
    last_was_eod: Tensor  # (B,) bool: the previous call ended a document
    pending: Tensor | None = None  # (B, V) logits of the previous call's last token

    def detach(self) -> ModelState:
        return ModelState({k: v.detach() for k, v in self.memories.items()}, self.last_was_eod, None)


def replace_op(state: LevelState, op: Any) -> LevelState:
    return LevelState(op, state.convs, state.position)


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


class Prefix(nn.Module):
    """`prefix(attention, memory-read)` (Titans MAC): attention over [persistent ‖ retrieved ‖ segment],
    run as one stream that interleaves each token's retrieval before the token (h_t, x_t, h_{t+1}, ...), so
    token t sees the retrievals of tokens ≤ t of its segment and nothing later."""

    def __init__(self, attention: list[nn.Module], read: list[nn.Module]) -> None:
        super().__init__()
        self.attention = nn.ModuleList(attention)
        self.read = nn.ModuleList(read)


class ReadSite(nn.Module):
    """One more read of a level, at the state it had at the start of the enclosing block of `every` tokens
    (`memory(read = boundary, every = 64)`), with its own copy of the level's query convolutions."""

    def __init__(self, instance: str, every: int) -> None:
        super().__init__()
        self.instance = instance
        self.every = every
        self.key = f"{instance}@read"


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
        self.companions = nn.ModuleDict()  # levels that only generate other levels' inputs (M_k, M_v, ...)
        self.read_sites: dict[str, ReadSite] = {}
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
        if layer.op == "prefix":
            return Prefix([self._build(b) for b in layer.body], [self._build(b) for b in layer.branches[0]])
        if layer.op == "read":
            site = ReadSite(layer.name, int(layer.options["every"]))
            self.read_sites[site.key] = site
            return site
        if layer.op == "memory":
            assert layer.level is not None
            level_plan = self.plan.levels[layer.level]
            module = level_class(level_plan)(level_plan, d, layer.name)
            self.levels[layer.name] = module
            module.group = dict(layer.companions)
            for template, instance in layer.companions.items():
                if instance not in self.levels:
                    companion_plan = self.plan.levels[template]
                    companion = level_class(companion_plan)(companion_plan, d, instance)
                    self.levels[instance] = companion
                    self.companions[instance] = companion
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
        self._backend = resolve_backend(value)
        fast = "chunked" if self._backend == "reference" else self._backend
        for level in self.levels.values():  # the memory levels' fast path: PyTorch or the generated kernels
            setattr(level, "fast_path", fast)  # noqa: B010 (mypy types nn.Module attributes as tensors)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The outer optimizer levels with the parameters each trains (exclusive: rule 3 of DESIGN §3), as
        `build_optimizers` takes them: `params` selectors, owners (`level memory in pretrain`) and the
        default owner resolved by `training.optimizers_select`."""
        from .training.optimizers_select import group_dicts

        return group_dicts(self, self.plan.optimizers, self.levels)

    def init_state(self, batch: int) -> ModelState:
        like = next(self.parameters())
        memories = {name: level.init_state(batch, like) for name, level in self.levels.items()}
        for key, site in self.read_sites.items():
            memories[key] = self.levels[site.instance].init_state(batch, like)
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
        returns (logits, state); `final=True` ends the stream (levels with `objective task` then apply
        their partial last chunk). With `probe=True` a dict of per-level tensors comes last."""
        streaming = state is not None
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise RuntimeInputError(f"tokens must be (batch, time) with time > 0, got {tuple(tokens.shape)}")
        batch = tokens.shape[0]
        current = state if state is not None else self.init_state(batch)
        starts = self._doc_starts(tokens, current, doc_start, streaming)
        memories = self._settle(current, tokens[:, 0], starts[:, 0]) if self.task_levels else current.memories
        run = self._reference if self.backend == "reference" else self._chunked
        # Task levels differentiate the loss inside the call (and the last token's logits in the next one),
        # so their graph is built even when the caller runs without grad; the result is detached below.
        with torch.enable_grad() if self.task_levels else contextlib.nullcontext():
            logits, memories, probes = run(tokens, memories, starts, probe)
            pending = logits[:, -1] if self.task_levels and streaming else None  # keeps its graph
        if pending is not None and final:
            memories = self._flush(memories)
            pending = None
        new_state = ModelState(memories, tokens[:, -1] == self.plan.eod, pending)
        if not torch.is_grad_enabled():
            logits = logits.detach()
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

    def _labels(self, tokens: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Next-token labels of each row and where they exist: not after a row's (or document's) end, not
        for an end-of-document token. A row's last token waits for the next call (it is pending)."""
        labels = torch.zeros_like(tokens)
        labels[:, :-1] = tokens[:, 1:]
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        length = lengths if lengths is not None else torch.full_like(tokens[:, 0], tokens.shape[1])
        labelled = (steps[None, :] + 1 < length[:, None]) & (tokens != self.plan.eod)
        return labels, labelled

    # ---- the reference interpreter: one token at a time through the whole model
    def _reference(
        self, tokens: Tensor, memories: States, starts: Tensor, probe: bool
    ) -> tuple[Tensor, States, dict[str, Probe]]:
        batch, length = tokens.shape
        fresh = self.init_state(batch).memories
        mem = dict(memories)
        later_start = torch.zeros_like(starts)
        later_start[:, :-1] = starts[:, 1:]
        labels, labelled = self._labels(tokens, None)
        labelled &= ~later_start  # the token before a document start is that document's... predecessor's last
        outputs, steps = [], []
        for t in range(length):
            reset = starts[:, t]
            if reset.any():
                mem = {name: where_rows(reset, fresh[name], s) for name, s in mem.items()}
            window = _Window(True, None, {name: {} for name in self.levels} if probe else None)
            outputs.append(
                self._step_window(
                    tokens[:, t : t + 1], mem, window, labels[:, t : t + 1], labelled[:, t : t + 1], t == length - 1
                )
            )
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
        if bool((starts == starts[:1]).all()):
            return self._aligned_documents(tokens, memories, starts, fresh, probe)
        docs = _Documents(starts)
        seg_fresh = self.init_state(docs.count).memories
        mem = {name: where_rows(docs.carries, s.select(docs.row), seg_fresh[name]) for name, s in memories.items()}
        logits, mem, probes = self._windows(docs.pack(tokens), mem, docs.length, probe)
        probes = {
            name: {k: docs.unpack(v.transpose(1, 2)).transpose(1, 2) for k, v in p.items()}
            for name, p in probes.items()
        }
        return docs.unpack(logits), {n: s.select(docs.last) for n, s in mem.items()}, probes

    def _aligned_documents(
        self, tokens: Tensor, memories: States, starts: Tensor, fresh: States, probe: bool
    ) -> tuple[Tensor, States, dict[str, Probe]]:
        """Every row starts its documents at the same places (a task's training batches): the documents run
        one after another on the whole batch, from fresh memories at each start. Repacking them as rows of
        their own would pad every document to the longest (HOPE on `mqar`: 3x the work, 12 GB)."""
        cuts = [0, *starts[0, 1:].nonzero().flatten().add(1).tolist(), tokens.shape[1]]
        mem = memories
        outputs, probes = [], []
        for start, stop in zip(cuts[:-1], cuts[1:]):
            mem = {name: where_rows(starts[:, start], fresh[name], s) for name, s in mem.items()}
            logits, mem, segment_probes = self._windows(tokens[:, start:stop], mem, None, probe)
            outputs.append(logits)
            probes.append(segment_probes or None)
        return torch.cat(outputs, 1), mem, _merge_probes(probes)

    def _windows(
        self, tokens: Tensor, mem: States, lengths: Tensor | None, probe: bool
    ) -> tuple[Tensor, States, dict[str, Probe]]:
        """The scheduler: advance the whole model one window at a time (all layers per window). With
        `objective task` levels the windows end at their chunk ends (depth-synchronous)."""
        length = tokens.shape[1]
        labels, labelled = self._labels(tokens, lengths)
        outputs, probes = [], []
        for start, stop in self._window_bounds(length, mem):
            lens = None if lengths is None else (lengths - start).clamp(0, stop - start)
            window = _Window(False, lens, {name: {} for name in self.levels} if probe else None)
            outputs.append(
                self._step_window(
                    tokens[:, start:stop], mem, window, labels[:, start:stop], labelled[:, start:stop], stop == length
                )
            )
            probes.append(window.probes)
        return torch.cat(outputs, 1), mem, _merge_probes(probes)

    def _window_bounds(self, length: int, mem: States) -> list[tuple[int, int]]:
        """Window ends fall on every chunk end that something waits for: task levels update there, and
        boundary reads of a level must not change inside a window."""
        aligned = self.task_levels + [self.levels[i] for lv in self.levels.values() for i in lv.group.values()]
        blocks = [level.plan.chunk for level in aligned] + [site.every for site in self.read_sites.values()]
        if blocks:
            # Not the call's length: gcd(82, 8) = 2 ran 2-token windows whenever documents were repacked.
            size = math.gcd(self.plan.window or 0, *blocks)
            anchor = aligned[0].instance if aligned else next(iter(self.read_sites))
            offsets = mem[anchor].position % size
            if bool((offsets != offsets[0]).any()):
                size = 1  # rows at different chunk phases: only single tokens keep every chunk end aligned
            else:
                first = (size - int(offsets[0])) % size or size
                bounds = [(0, min(first, length))]
                bounds += [(s, min(s + size, length)) for s in range(first, length, size)]
                return bounds
        else:
            size = self.plan.window or length
        return [(s, min(s + size, length)) for s in range(0, length, size)]

    def _step_window(
        self, tokens: Tensor, mem: States, window: _Window, labels: Tensor, labelled: Tensor, call_end: bool
    ) -> Tensor:
        """One window through every layer; then the task levels take this window's loss gradient and the
        ones whose chunk ended update (before the next window reads them)."""
        if not self.task_levels:
            return self._run(self.layers, tokens, mem, window)
        reads: list[TaskRead] = []
        for level in self.task_levels:
            level.pending = reads
        try:
            with torch.enable_grad():  # the task gradient is needed even when the caller runs without grad
                logits = self._run(self.layers, tokens, mem, window)
                scores = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
                ce = F.cross_entropy(scores.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
                ce = ce * labelled
                self._accumulate(mem, [(read.level, read.lr) for read in reads], ce)
        finally:
            for level in self.task_levels:
                level.pending = None
        used = window.lengths if window.lengths is not None else torch.full_like(labels[:, 0], labels.shape[1])
        last = (used - 1).clamp(min=0)
        pending_end = torch.full_like(labelled[:, 0], call_end) & (used == labels.shape[1])
        is_eod = tokens.gather(1, last[:, None])[:, 0] == self.plan.eod
        labelled_end = ~pending_end | is_eod
        updates = []
        for level in self.task_levels:
            op, now, due = level.advance(mem[level.instance].op, used, labelled_end)
            mem[level.instance] = replace_op(mem[level.instance], op)
            updates.append((level, now, due))
        self._update(mem, updates)
        return logits

    # ---- task levels across calls
    @property
    def task_levels(self) -> list[TaskLevel]:
        return [level for level in self.levels.values() if isinstance(level, TaskLevel)]

    def _settle(self, state: ModelState, first: Tensor, starts: Tensor) -> States:
        """Start of a streaming call: the previous call's last token now has its label; add its term to
        the running chunk gradients and apply the updates that were waiting for it."""
        mem = dict(state.memories)
        if state.pending is not None:
            with torch.enable_grad():
                pending = state.pending if state.pending.dtype == torch.float64 else state.pending.float()
                ce = F.cross_entropy(pending, first, reduction="none") * (~starts)
                self._accumulate(mem, [(level, mem[level.instance].op.last_lr) for level in self.task_levels], ce)
        # Reads of θ from the previous call stay: a chunk that continues still differentiates them.
        self._update(mem, [(level, mem[level.instance].op.due, None) for level in self.task_levels])
        return mem

    @staticmethod
    def _accumulate(mem: States, reads: list[tuple[TaskLevel, Tensor]], ce: Tensor) -> None:
        """Each task level adds Σ_t η_t ce_t of this window to its chunk's running loss. Levels whose rates
        are equal constants get the same term tensor, so their chunk gradients can share one backward pass
        (rates that carry a graph never share: their own derivative is part of the loss)."""
        made: list[tuple[Tensor, Tensor]] = []
        levels, terms = [], []
        for level, lr in reads:
            if level in levels:
                continue  # one term per level and window
            shared = [term for rate, term in made if not lr.requires_grad and _same_constant(rate, lr)]
            term = shared[0] if shared else (lr * ce).sum(1) if lr.dim() == 2 else lr * ce
            if not shared:
                made.append((lr, term))
            levels.append(level)
            terms.append(term)
        ops = add_loss_terms([mem[level.instance].op for level in levels], terms)
        for level, op in zip(levels, ops):
            mem[level.instance] = replace_op(mem[level.instance], op)

    @staticmethod
    def _update(mem: States, updates: Sequence[tuple[TaskLevel, Tensor, Tensor | None]]) -> None:
        """Levels whose chunk ended on some rows take the chunk's gradient there (shared passes where the
        losses are shared) and step; `due` rows wait for their last label."""
        with torch.enable_grad():  # the remaining rows' running losses keep their graphs
            settled = settle_gradients([(mem[level.instance].op, rows) for level, rows, _ in updates])
        for (level, rows, due), op in zip(updates, settled):
            mem[level.instance] = replace_op(mem[level.instance], level.update(op, rows, due))

    def _flush(self, mem: States) -> States:
        """End of a stream: every task level applies its partial last chunk (terms without labels left out)."""
        out = dict(mem)
        self._update(
            out,
            [
                (level, (out[level.instance].op.phase > 0) | out[level.instance].op.due, None)
                for level in self.task_levels
            ],
        )
        for level in self.task_levels:
            op: TaskState = out[level.instance].op
            out[level.instance] = replace_op(out[level.instance], replace(op, reads=[], loss=None))
        return out

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
            elif isinstance(layer, Prefix):
                h = self._run_prefix(layer, h, mem, window)
            elif isinstance(layer, ReadSite):
                h = self._read_site(layer, h, mem, window)
            elif isinstance(layer, Level) and layer.group:
                h = self._run_group(layer, h, mem, window)
            elif isinstance(layer, Level):
                probe = window.probes.get(layer.instance) if window.probes is not None else None
                h, mem[layer.instance] = layer.forward_window(
                    h, mem[layer.instance], window.lengths, probe, window.reference
                )
            else:
                h = layer(h)
        return h

    def _run_prefix(self, layer: Prefix, h: Tensor, mem: States, window: _Window) -> Tensor:
        retrieved = self._run(layer.read, h, mem, window)
        stream = torch.stack([retrieved, h], 2).flatten(1, 2)  # (B, 2T, d): h_t before x_t
        doubled = _Window(window.reference, None if window.lengths is None else 2 * window.lengths, None)
        out = stream
        for level in layer.attention:
            assert isinstance(level, Level), "prefix runs an attention level"
            probe: Probe | None = {} if window.probes is not None else None
            out, mem[level.instance] = level.forward_window(
                out, mem[level.instance], doubled.lengths, probe, window.reference
            )
            if window.probes is not None and probe is not None:
                window.probes[level.instance] = {k: v[:, :, 1::2] for k, v in probe.items()}
        return out[:, 1::2]

    def _read_site(self, site: ReadSite, h: Tensor, mem: States, window: _Window) -> Tensor:
        level = self.levels[site.instance]
        current, own = mem[site.instance], mem[site.key]
        at_start = own.position % site.every == 0  # rows at the start of a block: take a fresh snapshot
        snapshot = where_rows(at_start, LevelState(current.op, own.convs, own.position), own)
        query = level.exprs["query"] if "query" in level.exprs else None  # noqa: SIM401 (ModuleDict has no get)
        positions = own.position[:, None] + torch.arange(h.shape[1], device=h.device)
        convs = dict(own.convs)
        q = h
        if query is not None:
            q, convs["query"] = query(h, positions, own.convs["query"], window.lengths)  # type: ignore[operator]
        used = window.lengths if window.lengths is not None else torch.full_like(own.position, h.shape[1])
        mem[site.key] = LevelState(snapshot.op, convs, own.position + used)
        return level.read_at(snapshot, q, "boundary")

    def _run_group(self, layer: Level, h: Tensor, mem: States, window: _Window) -> Tensor:
        """A level with the levels that generate its inputs (self-modifying Titans): every member reads the
        others (and itself) at their boundary states, all before any member updates; then each updates."""

        # Members read the same producer at the same state with the same input (every member's keys are
        # M_k(x)): each distinct read is computed once per window. The cache holds the input, so its id
        # cannot be reused while the cache lives.
        reads: dict[tuple[str, str, int], tuple[Tensor, Tensor]] = {}

        def reader(template: str, mode: str, value: Tensor) -> Tensor:
            instance = layer.group[template]
            key = (instance, mode, id(value))
            if key not in reads:
                reads[key] = (value, self.levels[instance].read_at(mem[instance], value, mode))
            return reads[key][1]

        members = [i for i in dict.fromkeys([*layer.group.values(), layer.instance]) if i != layer.instance]
        members.append(layer.instance)  # the layer's own level last: its read is the output
        prepared = {i: self.levels[i].inputs(h, mem[i], window.lengths, reader) for i in members}
        out = h
        for instance in members:
            probe = window.probes.get(instance) if window.probes is not None else None
            out, mem[instance] = self.levels[instance].forward_window(
                h, mem[instance], window.lengths, probe, window.reference, prepared[instance]
            )
        return out


def _same_constant(a: Tensor, b: Tensor) -> bool:
    return not a.requires_grad and a.shape == b.shape and bool(torch.equal(a, b))


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

"""Generation: sample token by token with the model's streaming state, and save or reload that state.

The state carries every in-context level, so inner levels keep learning while the model generates; a saved
state continues the stream exactly where it stopped. A state file is a safetensors file: the tensors of the
`ModelState`, flattened to string keys (`memories/<instance>/op/<field>`, `.../convs/<role>/<name>`,
`last_was_eod`, `pending`), and in its header a small JSON of everything else (which fields are empty, the
system, spec hash and sizes it belongs to). Nothing is pickled; a state is rebuilt on a fresh state of the
same model, field by field.

Levels with `objective task` make one exception. Their θ, the running gradient G1/G2 of the chunk in
progress, its phase, `due` flag and last learning rate, and the pending logits are tensors and are saved, but
the reads of θ inside the open chunk are autograd graph (read records): later loss terms of the chunk reach
θ through them (the last token's term, whose label is the next token, and every later token through the
in-context states that those reads fed). So a file also keeps the stream's token history (each model call's
tokens, from a fresh state) while it is at most `MAX_REPLAY_TOKENS` long, and loading replays it, which
rebuilds the graph and continues bit for bit like a stream that never stopped; the replayed tensors are
checked against the saved ones. Past that length no history is kept and a reloaded stream continues from the
saved tensors without those records: exact up to the end of each open chunk, whose update then lacks the
gradient paths through the reads made before the save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import RuntimeInputError
from .model import CompiledModel, ModelState

log = logging.getLogger(__name__)

STATE_FORMAT = "nestc-state"
STATE_VERSION = 1
_META_KEY = "nestc"
MAX_REPLAY_TOKENS = 4096
"""The longest token history a state file keeps for models with `objective task` levels (see above)."""


def sample_next(
    logits: Tensor, generator: torch.Generator, *, temperature: float = 1.0, top_k: int | None = None
) -> int:
    """One token id from the logits (V,) of the last position: greedy at temperature 0, else softmax sampling
    at `temperature` among the `top_k` most likely tokens (all of them when None)."""
    logits = logits.detach().float().cpu()
    if temperature <= 0:
        return int(logits.argmax())
    scores = logits / temperature
    if top_k is not None and 0 < top_k < scores.numel():
        threshold = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: CompiledModel,
    prompt: list[int],
    *,
    max_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    state: ModelState | None = None,
    stop_at_eod: bool = True,
    history: list[list[int]] | None = None,
) -> tuple[list[int], ModelState]:
    """Continue the stream in `state` (a fresh one when None) with `prompt`, then sample up to `max_tokens`
    tokens, feeding each back in. Returns (new tokens, state after the prompt and every new token). Each model
    call's tokens are appended to `history` when given (what `save_state` keeps for a replay)."""
    calls = history if history is not None else []
    if not prompt:
        raise RuntimeInputError("the prompt is empty", hint="give at least one character with --prompt")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    current = state if state is not None else fresh_state(model)
    out: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with _inference(model):
            logits, current = model(torch.tensor([prompt], dtype=torch.long, device=device), current)
            calls.append(list(prompt))
            for _ in range(max_tokens):
                token = sample_next(logits[0, -1], generator, temperature=temperature, top_k=top_k)
                out.append(token)
                logits, current = model(torch.tensor([[token]], dtype=torch.long, device=device), current)
                calls.append([token])
                if stop_at_eod and token == model.plan.eod:
                    break
    finally:
        model.train(was_training)
    return out, current


@contextmanager
def _inference(model: CompiledModel) -> Iterator[None]:
    """No outer gradients. Levels with `objective task` differentiate their own reads between calls, so for
    them autograd stays on, with the parameters frozen so that no graph reaches them."""
    if not model.task_levels:
        with torch.no_grad():
            yield
        return
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def fresh_state(model: CompiledModel) -> ModelState:
    """The state of a new stream of one row (its first token starts a document)."""
    state = model.init_state(1)
    state.last_was_eod = torch.ones_like(state.last_was_eod)
    return state


def identity(model: CompiledModel) -> dict[str, Any]:
    """What a state must match to be loaded into `model`: system, spec hash and sizes."""
    plan = model.plan
    return {"system": plan.system, "source_hash": plan.source_hash, "params": plan.params}


# ---- flattening ------------------------------------------------------------------------------------------


def flatten_state(state: ModelState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors by key, JSON-able description of the non-tensor fields) of a state."""
    tensors: dict[str, Tensor] = {}
    info: dict[str, Any] = {"none": [], "scalars": {}, "dropped": []}
    _flatten(state.memories, "memories", tensors, info)
    tensors["last_was_eod"] = state.last_was_eod
    if state.pending is None:
        info["none"].append("pending")
    else:
        tensors["pending"] = state.pending
    return tensors, info


def _flatten(value: Any, key: str, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    if isinstance(value, Tensor):
        tensors[key] = value.detach()
    elif value is None:
        info["none"].append(key)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _flatten(getattr(value, f.name), f"{key}/{f.name}", tensors, info)
    elif isinstance(value, dict):
        for name, item in value.items():
            _flatten(item, f"{key}/{name}", tensors, info)
    elif isinstance(value, (list, tuple)):
        if value:  # autograd records of a chunk in progress: they cannot be stored
            info["dropped"].append(key)
    elif isinstance(value, (bool, int, float, str)):
        info["scalars"][key] = value
    else:
        raise TypeError(f"cannot store state field {key} of type {type(value).__name__}")


def unflatten_state(
    model: CompiledModel, tensors: dict[str, Tensor], info: dict[str, Any], *, where: str | None = None
) -> ModelState:
    """Rebuild a state of `model` (batch 1) from `flatten_state`'s output, on a fresh state as the template."""
    template = fresh_state(model)
    used: set[str] = set()
    nones = set(info.get("none", []))
    memories = _rebuild(template.memories, "memories", tensors, nones, info.get("scalars", {}), used, where)
    last = _take(tensors, "last_was_eod", template.last_was_eod, used, where)
    pending = None if "pending" in nones else _take(tensors, "pending", None, used, where)
    extra = sorted(set(tensors) - used)
    if extra:
        raise RuntimeInputError(
            f"the state has entries this model does not ({extra[0]!r}, {len(extra)} in all)",
            path=where,
            hint="the state was saved by another spec or size; delete it or use the matching spec",
        )
    device = template.last_was_eod.device
    return ModelState(memories, last.to(device), None if pending is None else pending.to(device))


def _rebuild(
    template: Any,
    key: str,
    tensors: dict[str, Tensor],
    nones: set[str],
    scalars: dict[str, Any],
    used: set[str],
    where: str | None,
) -> Any:
    if isinstance(template, Tensor) or template is None:
        if key in nones:
            return None
        return _take(tensors, key, template, used, where)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        values = {
            f.name: _rebuild(getattr(template, f.name), f"{key}/{f.name}", tensors, nones, scalars, used, where)
            for f in dataclasses.fields(template)
            if f.init
        }
        return dataclasses.replace(template, **values)
    if isinstance(template, dict):
        return {
            name: _rebuild(item, f"{key}/{name}", tensors, nones, scalars, used, where)
            for name, item in template.items()
        }
    if isinstance(template, (list, tuple)):
        return type(template)()
    return scalars.get(key, template)


def _take(tensors: dict[str, Tensor], key: str, like: Tensor | None, used: set[str], where: str | None) -> Tensor:
    if key not in tensors:
        raise RuntimeInputError(
            f"the state has no entry {key!r}",
            path=where,
            hint="the state was saved by another spec or size; delete it or use the matching spec",
        )
    value = tensors[key]
    if like is not None:
        if value.dim() != like.dim() or value.dtype != like.dtype:
            raise RuntimeInputError(
                f"state entry {key!r} is {value.dtype} {tuple(value.shape)}, this model expects "
                f"{like.dtype} with {like.dim()} dimensions",
                path=where,
                hint="the state was saved by another spec or size",
            )
        value = value.to(like.device)
    used.add(key)
    return value


# ---- files -----------------------------------------------------------------------------------------------


def save_state(
    path: str | os.PathLike[str],
    model: CompiledModel,
    state: ModelState,
    *,
    history: list[list[int]] | None = None,
    **extra: Any,
) -> Path:
    """Write `state` to the safetensors file `path` atomically (a temporary sibling, then a rename). `history`
    (the calls since a fresh state, see `generate`) is kept when the state has records a file cannot hold."""
    target = Path(path)
    tensors, info = flatten_state(state)
    replay = None
    if info["dropped"]:
        if history is not None and sum(len(call) for call in history) <= MAX_REPLAY_TOKENS:
            replay = [[int(t) for t in call] for call in history]
        else:
            log.warning(
                "state: the gradient records of a chunk in progress are not saved (%s) and the history is %s",
                info["dropped"],
                "unknown" if history is None else f"longer than {MAX_REPLAY_TOKENS} tokens",
            )
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, **identity(model), **info, **extra}
    meta["history"] = replay
    copies = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(copies, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise RuntimeInputError(f"cannot write the state: {error.strerror}", path=str(target)) from None
    return target


def load_state(path: str | os.PathLike[str], model: CompiledModel) -> tuple[ModelState, dict[str, Any]]:
    """Read a state written by `save_state` for `model`: (state, its metadata). A file of another spec or
    size, or a damaged one, raises `RuntimeInputError` naming the file."""
    where = str(path)
    try:
        with safe_open(where, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise RuntimeInputError(
            f"the state file is unreadable or corrupt ({str(error).splitlines()[0] if str(error) else error})",
            path=where,
            hint="delete it to start from a fresh state",
        ) from None
    try:
        meta = json.loads(header.get(_META_KEY, ""))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise RuntimeInputError(
            "the file is not a nestc state (no nestc header)", path=where, hint="give a file saved by --state"
        )
    if meta.get("version") != STATE_VERSION:
        raise RuntimeInputError(f"state version {meta.get('version')!r} is not {STATE_VERSION}", path=where)
    for key, value in identity(model).items():
        if meta.get(key) != value:
            raise RuntimeInputError(
                f"the state belongs to another model: {key} is {meta.get(key)!r} there but {value!r} here",
                path=where,
                hint="use the spec and sizes that saved it, or delete the state file",
            )
    state = unflatten_state(model, tensors, meta, where=where)
    history = meta.get("history")
    if isinstance(history, list) and history:
        state = _replay(model, history, tensors, where)
    return state, meta


def _replay(model: CompiledModel, history: list[Any], saved: dict[str, Tensor], where: str) -> ModelState:
    """The state rebuilt by feeding the history's calls through a fresh stream (records included)."""
    if not all(isinstance(call, list) and call and all(isinstance(t, int) for t in call) for call in history):
        raise RuntimeInputError("the state's history is malformed", path=where, hint="delete the state file")
    vocab = model.plan.vocab
    if any(not 0 <= t < vocab for call in history for t in call):
        raise RuntimeInputError("the state's history holds ids outside the vocabulary", path=where)
    device = next(model.parameters()).device
    current = fresh_state(model)
    was_training = model.training
    model.eval()
    try:
        with _inference(model):
            for call in history:
                _, current = model(torch.tensor([call], dtype=torch.long, device=device), current)
    finally:
        model.train(was_training)
    replayed, _ = flatten_state(current)
    differ = [k for k in saved if k not in replayed or not torch.equal(saved[k], replayed[k].detach().cpu())]
    if differ:  # another machine or thread count can round differently: the replay is still the stream
        log.warning("state: the replayed history differs from the saved tensors in %s", differ[:3])
    return current

"""Scoring: run a predictor over a task's examples, count what it gets right, and summarise.

A predictor maps tokens (B, T) to logits (B, T, V) whose position t predicts token t + 1 (a causal model
never looks ahead; the oracle does, which is what makes it one). Each scored position p of an example counts
as correct when the argmax of the logits at p - 1 is the token at p; its negative log-likelihood is summed
too, for losses and perplexity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import RuntimeInputError
from ..training.checkpoint import CheckpointManager, CheckpointMissing, check_compatible, load_checkpoint
from ..training.data import BYTE_VOCAB
from ..training.loop import CHECKPOINT_FORMAT, restore_model
from .tasks import Example, Task

Predictor = Callable[[Tensor], Tensor]
BATCH = 16


def score_examples(predict: Predictor, examples: list[Example], batch: int = BATCH) -> list[dict[str, Any]]:
    """One record per example: {"group", "spans": {name: {"correct", "count", "nll"}}}, in input order."""
    records: list[dict[str, Any] | None] = [None] * len(examples)
    by_length: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        by_length.setdefault(len(example.tokens), []).append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            tokens = torch.tensor([examples[i].tokens for i in chunk], dtype=torch.long)
            logits = predict(tokens)
            if logits.shape[:2] != tokens.shape:
                raise ValueError(f"the predictor returned {tuple(logits.shape)} for tokens {tuple(tokens.shape)}")
            logp = torch.log_softmax(logits.detach().double(), dim=-1)
            for row, index in enumerate(chunk):
                records[index] = _record(examples[index], tokens[row], logp[row])
    return [r for r in records if r is not None]


def _record(example: Example, tokens: Tensor, logp: Tensor) -> dict[str, Any]:
    spans = {}
    for name, positions in example.spans.items():
        where = torch.tensor(positions, dtype=torch.long)
        targets = tokens[where]
        rows = logp[where - 1]
        correct = int((rows.argmax(-1) == targets).sum())
        nll = float(-rows.gather(1, targets[:, None]).sum())
        spans[name] = {"correct": correct, "count": len(positions), "nll": nll}
    return {"group": example.group, "spans": spans}


def evaluate(predict: Predictor, task: Task, *, seed: int = 0, vocab: int = BYTE_VOCAB) -> dict[str, Any]:
    """Run `task`'s evaluation set (drawn with `seed`) through `predict`: {"task", "score", "rows", ...}."""
    gen = torch.Generator().manual_seed(seed)
    examples = task.examples(gen)
    records = score_examples(predict, examples)
    rows, headline = task.summarize(records)
    return {
        "task": task.name,
        "description": task.description,
        "seed": seed,
        "examples": len(examples),
        "chance": 1.0 / vocab,
        "score": headline,
        "rows": rows,
    }


# ---- predictors ------------------------------------------------------------------------------------------


def model_predictor(model: torch.nn.Module, window: int = 256) -> Predictor:
    """A compiled model as a predictor; sequences longer than `window` are streamed with the model's state
    (exact: the state carries every level across windows)."""

    def predict(tokens: Tensor) -> Tensor:
        device = next(model.parameters()).device
        tokens = tokens.to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if tokens.shape[1] <= window:
                    return model(tokens).float().cpu()
                state = model.init_state(tokens.shape[0])  # type: ignore[operator]
                state.last_was_eod = torch.ones_like(state.last_was_eod)
                pieces = []
                for start in range(0, tokens.shape[1], window):
                    logits, state = model(tokens[:, start : start + window], state)
                    pieces.append(logits.float().cpu())
                return torch.cat(pieces, 1)
        finally:
            model.train(was_training)

    return predict


def oracle_predictor(vocab: int = BYTE_VOCAB) -> Predictor:
    """Looks ahead: all its mass on the true next token."""

    def predict(tokens: Tensor) -> Tensor:
        logits = torch.zeros(*tokens.shape, vocab)
        logits[:, :-1].scatter_(2, tokens[:, 1:, None], 50.0)
        return logits

    return predict


def random_predictor(vocab: int = BYTE_VOCAB, seed: int = 0) -> Predictor:
    """Independent standard-normal logits: about 1 / vocab accuracy."""
    gen = torch.Generator().manual_seed(seed)

    def predict(tokens: Tensor) -> Tensor:
        return torch.randn(*tokens.shape, vocab, generator=gen)

    return predict


# ---- reports ---------------------------------------------------------------------------------------------


def render_table(result: dict[str, Any]) -> str:
    """The result's rows as an aligned text table, then the headline."""
    rows = result["rows"]
    lines = [f"{result['task']}: {result['description']} ({result['examples']} examples)"]
    if rows:
        columns = list(rows[0])
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        lines.extend("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells)
    score = ", ".join(f"{k} {_cell(v)}" for k, v in result["score"].items())
    lines.append(f"score: {score} (chance accuracy {result['chance']:.4f})")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write `data` as JSON to `path` through a temporary sibling and a rename."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        tmp.replace(target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise RuntimeInputError(f"cannot write the results: {error.strerror}", path=str(target)) from None
    return target


# ---- checkpoints -----------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A `ckpt-*` directory as given, or a run directory's newest checkpoint."""
    target = Path(path)
    if not target.exists():
        raise CheckpointMissing("checkpoint not found", path=str(target), hint="give a ckpt-* folder or a run folder")
    if (target / "model.safetensors").exists() or (target / "meta.json").exists():
        return target
    latest = CheckpointManager(target).latest()
    if latest is None:
        raise CheckpointMissing(
            "no checkpoint in this folder", path=str(target), hint="give a ckpt-* folder or a run folder of nestc train"
        )
    return latest


def load_trained(model: torch.nn.Module, path: str | os.PathLike[str], expected: dict[str, Any]) -> Path:
    """Load the weights of the checkpoint at `path` (see `resolve_checkpoint`) into `model`, after checking
    that it was written for the same system, spec and sizes (`expected`, from the plan). Returns its path."""
    where = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(where)
    check_compatible(meta, {"format": CHECKPOINT_FORMAT}, path=str(where))
    extra = meta.get("extra")
    check_compatible(extra if isinstance(extra, dict) else {}, expected, path=str(where))
    restore_model(model, tensors, str(where))
    return where

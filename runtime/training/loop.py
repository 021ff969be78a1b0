"""The training loop: settings, optimizers per group, LR schedule, logging, checkpoints and exact resume.

A run's whole state (weights, every optimizer's state, the sampler's generator, the global torch RNG and the
step) is checkpointed, so a run interrupted after a checkpoint and resumed computes exactly the same losses and
weights as one that never stopped.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from ..errors import RuntimeInputError
from . import faults
from .checkpoint import CheckpointManager, CheckpointMissing, check_compatible, load_checkpoint
from .data import EOD, BatchSampler, next_token_loss, split_holdout
from .metrics import MetricsWriter, loss_curve_png, truncate_metrics
from .optimizers import OUTER_OPTIMIZERS, LevelOptimizer

CHECKPOINT_FORMAT = "nestc-train"
CHECKPOINT_VERSION = 1
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss.png"
_FINAL_LR_FRACTION = 0.1
_OPTIMIZERS: dict[str, type[LevelOptimizer]] = OUTER_OPTIMIZERS  # the outer optimizer levels of DESIGN §5
_STATE_KEY = re.compile(r"^(\d+)\.(\w+)$")


class TrainSettings(BaseModel):
    """Run settings of `train` (from a TOML file or `--set`); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf and nan are not settings (nor JSON)

    steps: int = Field(1000, ge=1, description="total optimizer steps of the run (a resumed run counts on)")
    batch: int = Field(8, ge=1, description="sequences per step")
    seq_len: int = Field(128, ge=1, description="tokens per sequence")
    lr: float | None = Field(None, gt=0, description="learning rate of every group; None keeps each group's own")
    weight_decay: float | None = Field(None, ge=0, description="weight decay of every group; None keeps each's")
    warmup: int = Field(0, ge=0, description="steps of linear learning-rate warm-up")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up: cosine to 10%, or flat")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 turns it off")
    seed: int = Field(0, description="seed of the global torch RNG (and of the sampler built by make_sampler)")
    log_every: int = Field(10, ge=1, description="steps between lines of metrics.jsonl")
    ckpt_every: int = Field(0, ge=0, description="steps between checkpoints; 0 saves only at the end")
    keep_checkpoints: int = Field(3, ge=1, description="how many of the newest checkpoints to keep")
    holdout: float = Field(0.0, ge=0, lt=1, description="fraction of the corpus held out (its tail)")
    max_read: float = Field(
        1e6, ge=0, description="stop when a level's read grows past this (exploding inner updates); 0: no limit"
    )
    tokenizer: str = Field(
        "byte", pattern=r"^(byte|tiktoken:[A-Za-z0-9_.-]+)$", description="byte, or tiktoken:<encoding> (text only)"
    )


@dataclass
class GroupOptimizer:
    """One optimizer group: its name, kind, the torch optimizer and the learning rate before scheduling."""

    name: str
    kind: str
    optimizer: torch.optim.Optimizer
    base_lr: float


def make_sampler(tokens: torch.Tensor, settings: TrainSettings) -> tuple[BatchSampler, torch.Tensor]:
    """A sampler over the training part of `tokens` and the held-out tail (`settings.holdout` of them)."""
    train_tokens, held_out = split_holdout(tokens, settings.holdout)
    return BatchSampler(train_tokens, settings.batch, settings.seq_len, settings.seed), held_out


def lr_factor(step: int, settings: TrainSettings) -> float:
    """The multiplier of the base learning rate at `step` (1-based): linear warm-up, then cosine or flat."""
    if settings.warmup and step <= settings.warmup:
        return step / settings.warmup
    if settings.schedule == "constant":
        return 1.0
    span = settings.steps - settings.warmup - 1
    progress = min(1.0, (step - settings.warmup - 1) / span) if span > 0 else 1.0
    return _FINAL_LR_FRACTION + (1 - _FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizers(groups: list[dict[str, Any]], settings: TrainSettings) -> list[GroupOptimizer]:
    """One torch optimizer per group dict `{"name", "kind", "params", "lr", "weight_decay", ...}`."""
    built: list[GroupOptimizer] = []
    seen_names: set[str] = set()
    seen_params: set[int] = set()
    for group in groups:
        name = str(group.get("name", ""))
        if not name or name in seen_names:
            raise RuntimeInputError(f"optimizer group names must be unique and non-empty, got {name!r}")
        seen_names.add(name)
        for param in group.get("params", []):
            if id(param) in seen_params:
                raise RuntimeInputError(f"optimizer group {name!r} repeats a parameter of an earlier group")
            seen_params.add(id(param))
        built.append(_build_optimizer(name, group, settings))
    if not built:
        raise RuntimeInputError("there are no optimizer groups", hint="the model has no trainable parameters")
    return built


def _build_optimizer(name: str, group: dict[str, Any], settings: TrainSettings) -> GroupOptimizer:
    options = {key: value for key, value in group.items() if key not in ("name", "kind", "params")}
    kind = str(group.get("kind", ""))
    if kind not in _OPTIMIZERS:
        raise RuntimeInputError(
            f"optimizer group {name!r} has unknown kind {kind!r}", hint=f"use one of {sorted(_OPTIMIZERS)}"
        )
    lr = settings.lr if settings.lr is not None else options.get("lr")
    if lr is None:
        raise RuntimeInputError(f"optimizer group {name!r} has no learning rate", hint="set optim.lr")
    options["lr"] = float(lr)
    if settings.weight_decay is not None and "weight_decay" in inspect.signature(_OPTIMIZERS[kind]).parameters:
        options["weight_decay"] = settings.weight_decay
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    try:
        optimizer = _OPTIMIZERS[kind](list(group.get("params", [])), **options)
    except (TypeError, ValueError) as error:
        raise RuntimeInputError(f"optimizer group {name!r}: {error}") from None
    return GroupOptimizer(name, kind, optimizer, float(lr))


@dataclass
class _Progress:
    """What the loop measures between log lines and over the run."""

    start_step: int
    elapsed_before: float
    started: float = field(default_factory=time.perf_counter)
    first_loss: float | None = None
    last_loss: float | None = None
    interval_losses: list[float] = field(default_factory=list)
    interval_started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def train(
    model: torch.nn.Module,
    optimizer_groups: list[dict[str, Any]],
    sampler: BatchSampler,
    settings: TrainSettings,
    out_dir: str | os.PathLike[str],
    *,
    eod: int = EOD,
    resume: bool = False,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` for `settings.steps` steps (in total, counting a resumed run's earlier steps).

    `model(tokens)` maps a LongTensor (B, T) to logits (B, T, V); the sampler fixes B and T. Metrics go to
    `out_dir/metrics.jsonl`, checkpoints to `out_dir/ckpt-<step>`. `extra_meta` is stored in each checkpoint
    and must match on resume (put what identifies the model there: spec hash, sizes). Returns
    {"first_loss", "last_loss", "steps", "tokens_per_s", "checkpoint"} for this invocation.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optimizers = build_optimizers(optimizer_groups, settings)
    manager = CheckpointManager(out, keep=settings.keep_checkpoints)
    extra = dict(extra_meta or {})
    metrics_path = out / METRICS_FILE
    if resume:
        start_step, elapsed_before = _resume(model, optimizers, sampler, manager, extra)
        truncate_metrics(metrics_path, start_step)
    else:
        _require_fresh(manager)
        metrics_path.unlink(missing_ok=True)
        torch.manual_seed(settings.seed)
        start_step, elapsed_before = 0, 0.0
    run = _Progress(start_step, elapsed_before)
    checkpoint = _run_steps(model, optimizers, sampler, settings, manager, run, eod=eod, extra=extra, progress=progress)
    loss_curve_png(metrics_path, out / LOSS_CURVE_FILE)
    done = settings.steps - start_step if settings.steps > start_step else 0
    seconds = time.perf_counter() - run.started
    return {
        "first_loss": run.first_loss,
        "last_loss": run.last_loss,
        "steps": max(settings.steps, start_step),
        "tokens_per_s": done * sampler.batch * sampler.seq_len / seconds if done and seconds > 0 else 0.0,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }


def _require_fresh(manager: CheckpointManager) -> None:
    existing = manager.latest()
    if existing is not None:
        raise RuntimeInputError(
            "the output folder already holds checkpoints of another run",
            path=str(existing),
            hint="pass --resume to continue that run, or choose another output folder",
        )


def _run_steps(
    model: torch.nn.Module,
    optimizers: list[GroupOptimizer],
    sampler: BatchSampler,
    settings: TrainSettings,
    manager: CheckpointManager,
    run: _Progress,
    *,
    eod: int,
    extra: dict[str, Any],
    progress: bool,
) -> Path | None:
    """The steps from `run.start_step + 1` to `settings.steps`; returns the newest checkpoint."""
    params = [p for group in optimizers for g in group.optimizer.param_groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    tokens_per_step = sampler.batch * sampler.seq_len
    model.train()
    bar = tqdm(total=settings.steps, initial=run.start_step, disable=not progress, unit="step", desc="train")
    metrics = MetricsWriter(manager.out_dir / METRICS_FILE)
    try:
        for step in range(run.start_step + 1, settings.steps + 1):
            lr = _apply_schedule(optimizers, settings, step)
            window = sampler.next().to(device)
            with faults.watching(model) as watch:
                loss = _train_step(model, optimizers, params, window, settings, eod, watch)
            _stop_on_fault(model, window[:, :-1], loss, watch, step, manager, settings)
            run.first_loss = loss if run.first_loss is None else run.first_loss
            run.last_loss = loss
            run.interval_losses.append(loss)
            rate = (step - run.start_step) * tokens_per_step / max(time.perf_counter() - run.started, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if step % settings.log_every == 0 or step == settings.steps:
                _log(metrics, run, step, lr, tokens_per_step)
            if (settings.ckpt_every and step % settings.ckpt_every == 0) or step == settings.steps:
                tensors, meta = _snapshot(model, optimizers, sampler, settings, step, run.elapsed(), extra)
                manager.save(step, tensors, meta)
    finally:
        metrics.close()
        bar.close()
    return manager.latest()


def _apply_schedule(optimizers: list[GroupOptimizer], settings: TrainSettings, step: int) -> float:
    """Set every group's learning rate for `step`; returns the first group's."""
    factor = lr_factor(step, settings)
    for group in optimizers:
        for param_group in group.optimizer.param_groups:
            param_group["lr"] = group.base_lr * factor
    return optimizers[0].base_lr * factor


def _train_step(
    model: torch.nn.Module,
    optimizers: list[GroupOptimizer],
    params: list[torch.nn.Parameter],
    window: torch.Tensor,
    settings: TrainSettings,
    eod: int,
    watch: faults.ReadWatch | None = None,
) -> float:
    """One forward, backward, clip and update; returns the loss before the update. A non-finite loss, or a level
    read past `settings.max_read`, skips the update (the caller stops the run)."""
    loss = next_token_loss(model(window[:, :-1]), window, eod)
    value = float(loss.item())
    healthy = math.isfinite(value) and (watch is None or watch.within(settings.max_read))
    if watch is not None:
        healthy = watch.everywhere = faults.agree(healthy)  # processes of a distributed run skip together
    if not healthy:
        return value
    for group in optimizers:
        group.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    for group in optimizers:
        group.optimizer.step()
    return value


def _stop_on_fault(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    loss: float,
    watch: faults.ReadWatch,
    step: int,
    manager: CheckpointManager,
    settings: TrainSettings,
) -> None:
    """Stop the run (keeping the checkpoints) if the step's loss is not finite or a level's read exploded, naming
    the level, token and step."""
    fault = faults.check_step(model, inputs, loss, watch, step, settings.max_read)
    if fault is None:
        return
    last_good = manager.latest()
    keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
    raise RuntimeInputError(
        fault.message(),
        path=str(manager.out_dir),
        hint=f"lower the learning rate (inner or outer), add warm-up or keep grad_clip on, then resume; {keep}",
    )


def _log(metrics: MetricsWriter, run: _Progress, step: int, lr: float, tokens_per_step: int) -> None:
    """Append the mean loss and the throughput since the previous line."""
    now = time.perf_counter()
    count = len(run.interval_losses)
    metrics.write(
        {
            "step": step,
            "loss": sum(run.interval_losses) / count,
            "tokens_per_s": count * tokens_per_step / max(now - run.interval_started, 1e-9),
            "lr": lr,
            "elapsed_s": run.elapsed(),
        }
    )
    run.interval_losses.clear()
    run.interval_started = now


def _snapshot(
    model: torch.nn.Module,
    optimizers: list[GroupOptimizer],
    sampler: BatchSampler,
    settings: TrainSettings,
    step: int,
    elapsed: float,
    extra: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The run's whole state as flat tensors plus JSON metadata."""
    tensors = {f"model.{key}": value for key, value in model.state_dict().items()}
    optimizer_meta = []
    for group in optimizers:
        group_tensors, scalars = _flatten_optimizer_state(group)
        tensors.update(group_tensors)
        count = sum(len(g["params"]) for g in group.optimizer.param_groups)
        optimizer_meta.append({"name": group.name, "kind": group.kind, "params": count, "scalars": scalars})
    sampler_state = sampler.state_dict()
    for key in [key for key, value in sampler_state.items() if isinstance(value, torch.Tensor)]:
        tensors[f"sampler.{key}"] = sampler_state.pop(key)  # generator states go to safetensors, not JSON
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "elapsed_s": elapsed,
        "settings": settings.model_dump(),
        "sampler": sampler_state,
        "optimizers": optimizer_meta,
        "extra": extra,
    }
    return tensors, meta


def _flatten_optimizer_state(group: GroupOptimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`optim.<group>.<param_index>.<key>` tensors and `<param_index>.<key>` scalars of one optimizer."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in group.optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{group.name}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, scalars


def _resume(
    model: torch.nn.Module,
    optimizers: list[GroupOptimizer],
    sampler: BatchSampler,
    manager: CheckpointManager,
    extra: dict[str, Any],
) -> tuple[int, float]:
    """Load the newest checkpoint of `manager` into the run; returns (step, elapsed seconds)."""
    path = manager.latest()
    if path is None:
        raise CheckpointMissing(
            "there is no checkpoint to resume from",
            path=str(manager.out_dir),
            hint="start the run without --resume",
        )
    tensors, meta = load_checkpoint(path)
    where = str(path)
    check_compatible(meta, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}, path=where)
    check_compatible(meta.get("extra", {}), extra, path=where)
    saved_groups = [(g.get("name"), g.get("kind")) for g in meta.get("optimizers", [])]
    current_groups = [(g.name, g.kind) for g in optimizers]
    check_compatible({"optimizer groups": saved_groups}, {"optimizer groups": current_groups}, path=where)
    restore_model(model, tensors, where)
    for group, group_meta in zip(optimizers, meta["optimizers"]):
        _restore_optimizer(group, tensors, group_meta.get("scalars", {}), where)
    _restore_sampler(sampler, tensors, meta, where)
    torch.set_rng_state(_required(tensors, "rng.torch", where))
    return int(meta["step"]), float(meta.get("elapsed_s", 0.0))


def _required(tensors: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in tensors:
        raise RuntimeInputError(f"the checkpoint has no tensor {key!r}", path=where, hint="use another checkpoint")
    return tensors[key]


def restore_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    weights = {key[len("model.") :]: value for key, value in tensors.items() if key.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise RuntimeInputError(
            f"the checkpoint's weights do not fit this model: {_first_line(error)}",
            path=where,
            hint="resume with the same spec and sizes as the run that wrote the checkpoint",
        ) from None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:3])[:300]


def _restore_optimizer(
    group: GroupOptimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], where: str
) -> None:
    """Rebuild one optimizer's per-parameter state from its flattened tensors and scalars."""
    prefix = f"optim.{group.name}."
    flat: dict[str, Any] = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    flat.update(scalars)
    params = [p for g in group.optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        match = _STATE_KEY.match(key)
        if not match:
            continue  # belongs to another group whose name starts with this one's
        index, name = int(match.group(1)), match.group(2)
        if index >= len(params) or (
            isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != _state_shape(group, index, name)
        ):
            raise RuntimeInputError(
                f"the optimizer state of group {group.name!r} does not fit this model (parameter {index})",
                path=where,
                hint="resume with the same spec and sizes as the run that wrote the checkpoint",
            )
        state.setdefault(index, {})[name] = value
    current = group.optimizer.state_dict()
    current["state"] = state
    group.optimizer.load_state_dict(current)


def _state_shape(group: GroupOptimizer, index: int, key: str) -> torch.Size:
    """The shape a state tensor must have: the optimizer's own (a DMGD memory), else its parameter's."""
    param = [p for g in group.optimizer.param_groups for p in g["params"]][index]
    own = group.optimizer.state_shape(param, key) if isinstance(group.optimizer, LevelOptimizer) else None
    return torch.Size(own) if own is not None else param.shape


def _restore_sampler(sampler: BatchSampler, tensors: dict[str, torch.Tensor], meta: dict, where: str) -> None:
    state = dict(meta.get("sampler", {}))
    state["generator"] = _required(tensors, "sampler.generator", where)
    state.update({name.removeprefix("sampler."): t for name, t in tensors.items() if name.startswith("sampler.")})
    sampler.load_state_dict(state)

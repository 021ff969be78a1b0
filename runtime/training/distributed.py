"""Several processes: DDP with the gloo backend (CPU) under `torchrun --nproc-per-node N -m nestc train ...`.

`torchrun` sets `WORLD_SIZE`, `RANK` and `LOCAL_RANK`; with more than one process `setup()` joins the process
group. Every rank draws the same global batch from the same seeded sampler and trains on its own slice of the
rows (`ShardedSampler`), DDP averages the gradients, so a step equals one process's step on the global batch
(up to the per-rank weighting of the loss when ranks hold different numbers of labelled tokens). Only rank 0
writes metrics and checkpoints into the run folder; the other ranks write into a scratch folder of their own
(a resumed run links rank 0's checkpoints there, so every rank resumes from the same one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import RuntimeInputError
from .checkpoint import CheckpointManager


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: world size, rank and local rank (1, 0, 0 for a single process)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from(environ: dict[str, str] | None = None) -> DistEnv:
    """Read `WORLD_SIZE`, `RANK`, `LOCAL_RANK` (absent: a single process)."""
    source = os.environ if environ is None else environ
    try:
        world = int(source.get("WORLD_SIZE", "1"))
        rank = int(source.get("RANK", "0"))
        local = int(source.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise RuntimeInputError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers", hint="start several processes with torchrun"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise RuntimeInputError(f"RANK={rank} does not fit WORLD_SIZE={world}", hint="start with torchrun")
    return DistEnv(world, rank, local)


def setup(environ: dict[str, str] | None = None) -> DistEnv:
    """Join the gloo process group when there are several processes; returns where this one stands."""
    env = env_from(environ)
    if env.active and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return env


def cleanup(env: DistEnv) -> None:
    """Leave the process group. Drop the DDP wrapper first: if its reducer held the group's last reference,
    the group would be destroyed while Python frees the reducer, holding the GIL, and joining gloo's worker
    threads deadlocks when one of them waits for the GIL to free a finished collective's tensors (seen as a
    run that prints its result and never exits). The barrier lets every earlier collective finish and be freed
    while this thread waits without the GIL."""
    if env.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ShardedSampler:
    """This rank's rows of the global batch drawn by `sampler` (every rank draws the same batch)."""

    def __init__(self, sampler: Any, env: DistEnv) -> None:
        if sampler.batch % env.world_size:
            raise RuntimeInputError(
                f"the batch ({sampler.batch}) does not split evenly over {env.world_size} processes",
                hint=f"use a batch that is a multiple of {env.world_size}",
            )
        self.inner = sampler
        self.env = env
        self.batch = sampler.batch // env.world_size
        self.seq_len = sampler.seq_len

    def next(self) -> torch.Tensor:
        rows = self.inner.next()
        return rows[self.env.rank * self.batch : (self.env.rank + 1) * self.batch]

    __next__ = next

    def __iter__(self) -> ShardedSampler:
        return self

    def state_dict(self) -> dict[str, Any]:
        return dict(self.inner.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class DistributedModel(nn.Module):
    """A model under DDP whose `state_dict` keys are the model's own (checkpoints stay interchangeable with
    single-process runs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = DistributedDataParallel(model, find_unused_parameters=True)
        self.inner = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.ddp(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)


@contextmanager
def run_folder(out: Path, env: DistEnv, resume: bool) -> Iterator[Path]:
    """The folder this rank's training loop writes to: `out` on rank 0, a scratch folder on the others."""
    if env.is_main:
        yield out
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"nestc-rank{env.rank}-"))
    try:
        if resume:
            for checkpoint in CheckpointManager(out).checkpoints():
                (scratch / checkpoint.name).symlink_to(checkpoint.resolve(), target_is_directory=True)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def mean_over_ranks(value: float | None, env: DistEnv) -> float | None:
    """The mean of a float over every rank (a loss of each rank's slice → the loss of the global batch)."""
    if not env.active or value is None:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / env.world_size


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()

"""Numerical faults: a diverging level is named with the token and step where it went wrong, the run stops with
exit 1 and one message, and the last good checkpoint stays intact.

Divergence is planted where the answer is known: one byte's embedding row is made huge (the inner updates that
store it explode at its first occurrence) or NaN; a level's value map is scaled so that only that level explodes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nestc.cli import main
from nestc.pipeline import front_end, to_plan
from nestc_runtime import CompiledModel
from nestc_runtime.training import faults
from nestc_runtime.training.checkpoint import CheckpointManager, load_checkpoint
from nestc_runtime.training.data import next_token_loss

ROOT = Path(__file__).parents[1]
# A memory read straight from the embedding (no norm in between), so an embedding row reaches the values as is.
SPEC = """\
system plain(d = 16, heads = 2, layers = 2, vocab = 257) {
  level train { update every step; optimizer adamw(lr = 1e-3) }
  level memory in train {
    memory    matrix per head
    queries   linear(x) |> l2norm
    keys      linear(x) |> l2norm
    values    linear(x)
    objective l2(memory(keys), values)
    optimizer gd(lr = 0.5, retain = 1)
    update every token; read online
  }
  block = residual(memory -> linear)
  model = embed -> block * layers -> rmsnorm -> head
}
"""
MARK = ord("Z")


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "plain.nest"
    path.write_text(SPEC)
    return path


def model_of(spec: Path) -> CompiledModel:
    torch.manual_seed(0)
    return CompiledModel(to_plan(front_end(spec)), backend="chunked")


def window_with_mark(row: int, token: int, batch: int = 3, length: int = 24) -> torch.Tensor:
    """Random lowercase bytes, with the mark byte at (row, token) and nowhere else."""
    gen = torch.Generator().manual_seed(1)
    window = torch.randint(ord("a"), ord("z") + 1, (batch, length + 1), generator=gen)
    window[row, token] = MARK
    return window


def step_fault(model: CompiledModel, window: torch.Tensor, limit: float = 1e6) -> faults.Fault | None:
    """What the training loop does for one step: the forward under the watch, then the check."""
    with faults.watching(model) as watch:
        loss = float(next_token_loss(model(window[:, :-1]), window, 256).detach())
    return faults.check_step(model, window[:, :-1], loss, watch, step=7, limit=limit)


def test_a_healthy_step_has_no_fault(spec: Path) -> None:
    model = model_of(spec)
    assert step_fault(model, window_with_mark(1, 5)) is None
    assert all(level.watch is None for level in model.levels.values())  # the hook is removed after the step


def test_exploding_inner_updates_name_the_level_token_and_step(spec: Path) -> None:
    model = model_of(spec)
    with torch.no_grad():
        model.layers[0].weight[MARK] = 1e9  # storing this value makes the first level's reads explode
    fault = step_fault(model, window_with_mark(row=2, token=11))
    assert fault is not None
    assert (fault.kind, fault.level, fault.row, fault.token, fault.step) == ("exploding", "memory[0]", 2, 11, 7)
    assert fault.part == "read" and fault.size is not None and fault.size > 1e6
    message = fault.message()
    assert "memory[0]" in message and "token 11 of sequence 2" in message and "step 7" in message
    assert "\n" not in message


def test_nan_is_traced_to_the_first_level_and_token(spec: Path) -> None:
    model = model_of(spec)
    with torch.no_grad():
        model.layers[0].weight[MARK] = math.nan
    fault = step_fault(model, window_with_mark(row=0, token=4))
    assert fault is not None and fault.kind == "NaN"
    assert (fault.level, fault.row, fault.token) == ("memory[0]", 0, 4)
    assert fault.part in ("queries", "keys", "values")  # the level's inputs were NaN already
    assert fault.message().startswith("loss became NaN at step 7: level `memory[0]` at token 4 of sequence 0")


def test_only_the_second_level_explodes(spec: Path) -> None:
    model = model_of(spec)
    with torch.no_grad():
        for name, param in model.levels["memory[1]"].named_parameters():
            if "value" in name:
                param.mul_(1e8)
    fault = step_fault(model, window_with_mark(1, 3))
    assert fault is not None and (fault.kind, fault.level, fault.token) == ("exploding", "memory[1]", 0)


def test_the_limit_can_be_turned_off(spec: Path) -> None:
    model = model_of(spec)
    with torch.no_grad():
        model.layers[0].weight[MARK] = 1e9
    assert step_fault(model, window_with_mark(0, 2), limit=0) is None  # finite loss, no limit: no fault


def test_reductions_are_the_only_hot_path_cost(spec: Path) -> None:
    """A healthy step never re-runs the forward: `locate` is only called on a fault."""
    model = model_of(spec)
    calls = []
    original = faults.locate
    try:
        faults.locate = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[assignment]
        assert step_fault(model, window_with_mark(0, 2)) is None
    finally:
        faults.locate = original  # type: ignore[assignment]
    assert not calls


# ---- through `nestc train`: exit 1, one message, the last good checkpoint intact ------------------------------


def test_train_stops_cleanly_and_keeps_the_last_good_checkpoint(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    run = tmp_path / "run"
    args = ["train", str(spec), "--data", str(corpus), "--batch", "2", "--seq-len", "16", "--no-progress"]
    args += ["--out", str(run), "--set", "train.ckpt_every=2"]
    assert main([*args, "--steps", "4"]) == 0
    good = load_checkpoint(run / "ckpt-00000004")[0]
    capsys.readouterr()
    # the resumed run's reads are all above this tiny limit: step 5 is reported, nothing is saved
    code = main([*args, "--steps", "8", "--resume", "--set", "train.max_read=1e-6"])
    err = capsys.readouterr().err
    assert code == 1
    assert "exploded at step 5" in err and "level `memory[0]` at token 0 of sequence" in err, err
    assert "the last good checkpoint is" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1
    latest = CheckpointManager(run).latest()
    assert latest is not None and latest.name == "ckpt-00000004"
    tensors = load_checkpoint(latest)[0]
    assert tensors.keys() == good.keys() and all(torch.equal(tensors[k], good[k]) for k in good)
    # and the run goes on from there once the limit is back
    assert main([*args, "--steps", "6", "--resume"]) == 0


def test_huber_clips_the_inner_gradient_and_contains_the_explosion(tmp_path: Path) -> None:
    """Per-level inner-gradient clipping is the objective `huber(..., delta = δ)`: its gradient is l2's with the
    error M k − v clipped to [−δ, δ] per entry, so the same planted value that explodes the l2 level leaves the
    huber level's reads bounded (by η δ √d_v per token, with unit keys and queries)."""
    path = tmp_path / "huber.nest"
    path.write_text(SPEC.replace("l2(memory(keys), values)", "huber(memory(keys), values, delta = 1)"))
    model = model_of(path)
    with torch.no_grad():
        model.layers[0].weight[MARK] = 1e9
    assert step_fault(model, window_with_mark(row=2, token=11)) is None
    with faults.watching(model) as watch:
        model(window_with_mark(row=2, token=11)[:, :-1])
    peak = watch.peak()
    assert peak is not None and peak[1] < 1e3


# ---- distributed runs: every process skips the update together -------------------------------------------------


def _agree_worker(rank: int, world: int, port: int, results: object) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = (faults.agree(True), faults.agree(rank != 1))  # type: ignore[index]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_processes_agree_when_one_of_them_diverges() -> None:
    """A process whose step diverged skips its backward; DDP would leave the others waiting in all-reduce unless
    they skip too: `agree` is False everywhere as soon as one process is unhealthy."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_agree_worker, args=(2, port, results), nprocs=2, join=True)
    assert dict(results) == {0: (True, False), 1: (True, False)}


def test_a_healthy_process_stops_when_another_diverged(spec: Path) -> None:
    model = model_of(spec)
    window = window_with_mark(0, 2)
    with faults.watching(model) as watch:
        loss = float(next_token_loss(model(window[:, :-1]), window, 256).detach())
    watch.everywhere = False  # what `agree` reports when another process diverged
    fault = faults.check_step(model, window[:, :-1], loss, watch, step=3, limit=1e6)
    assert fault is not None and fault.kind == "elsewhere"
    assert fault.message() == "another process of this run diverged at step 3 (its own error names the level)"

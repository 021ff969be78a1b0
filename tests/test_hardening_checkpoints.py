"""Checkpoints and state files: safetensors and JSON only, pickles refused (and never run), damaged or mismatched
checkpoints a clear exit 1 (missing: exit 2), and `kill -9` of a run (even while it writes a checkpoint) loses
at most the steps since its last checkpoint: `--resume` then ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nestc.cli import main
from nestc_runtime.training.checkpoint import CheckpointManager, load_checkpoint

ROOT = Path(__file__).parents[1]
SPEC = str(ROOT / "specs" / "deltanet.nest")
OTHER_SPEC = str(ROOT / "specs" / "gated_deltanet.nest")
TINY = ["--set", "d=16", "--batch", "2", "--seq-len", "16", "--no-progress"]
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle protocols, torch zip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("nested learning keeps learning while it reads. " * 60)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    args = ["train", SPEC, *TINY, "--data", str(corpus), "--steps", "4", "--set", "train.ckpt_every=2"]
    assert main([*args, "--out", str(out)]) == 0
    return out


class Payload:
    """Unpickling this runs `touch <path>`: the proof that a file was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


def _pickle_file(path: Path, sentinel: Path) -> None:
    torch.save({"model.layers.0.weight": torch.zeros(2), "x": Payload(sentinel)}, path)


# ---- what a checkpoint is made of --------------------------------------------------------------------------------


def test_checkpoints_hold_safetensors_and_json_only(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    state = tmp_path / "memory.safetensors"
    args = ["generate", SPEC, "--set", "d=16", "--ckpt", str(run_dir), "--prompt", "ab", "--max-tokens", "2"]
    assert main([*args, "--state", str(state)]) == 0
    checkpoints = CheckpointManager(run_dir).checkpoints()
    assert [c.name for c in checkpoints] == ["ckpt-00000002", "ckpt-00000004"]
    for path in [*checkpoints, state]:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        assert {f.name for f in files} <= {"model.safetensors", "meta.json", state.name}
        for file in files:
            assert not file.read_bytes().startswith(PICKLE_MAGIC), f"{file} looks like a pickle"
            if file.suffix == ".json":
                assert isinstance(json.loads(file.read_text()), dict)
            else:
                with safe_open(str(file), framework="pt") as handle:
                    assert list(handle.keys())


def test_a_pickle_is_refused_and_never_unpickled(
    run_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentinel = tmp_path / "UNPICKLED"
    fake = tmp_path / "run" / "ckpt-00000001"
    fake.mkdir(parents=True)
    _pickle_file(fake / "model.safetensors", sentinel)
    (fake / "meta.json").write_text((run_dir / "ckpt-00000004" / "meta.json").read_text())
    state = tmp_path / "state.safetensors"
    _pickle_file(state, sentinel)
    commands = [
        ["eval", SPEC, "--set", "d=16", "--ckpt", str(fake), "--task", "memorize"],
        ["generate", SPEC, "--set", "d=16", "--ckpt", str(fake), "--prompt", "a"],
        ["generate", SPEC, "--set", "d=16", "--ckpt", str(run_dir), "--prompt", "a", "--state", str(state)],
        ["train", SPEC, *TINY, "--data", str(corpus), "--steps", "6", "--out", str(fake.parent), "--resume"],
    ]
    for args in commands:
        capsys.readouterr()
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert "corrupt" in err and "Traceback" not in err, err
    assert not sentinel.exists(), "a pickle was unpickled"


# ---- damaged, mismatched and missing checkpoints through the commands ------------------------------------------


def _copy_run(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to)
    return to


def test_damaged_or_mismatched_checkpoints_exit_1_and_missing_exit_2(
    run_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resume = ["train", SPEC, *TINY, "--data", str(corpus), "--steps", "6", "--resume"]

    def exit_of(args: list[str], needle: str) -> int:
        capsys.readouterr()
        code = main(args)
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.startswith("error")]) == 1, err
        return code

    truncated = _copy_run(run_dir, tmp_path / "truncated")
    weights = truncated / "ckpt-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert exit_of([*resume, "--out", str(truncated)], "corrupt") == 1
    assert exit_of(["eval", SPEC, "--set", "d=16", "--ckpt", str(truncated), "--task", "memorize"], "corrupt") == 1

    flipped = _copy_run(run_dir, tmp_path / "flipped")
    data = bytearray((flipped / "ckpt-00000004" / "model.safetensors").read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    (flipped / "ckpt-00000004" / "model.safetensors").write_bytes(bytes(data))
    assert exit_of([*resume, "--out", str(flipped)], "corrupt") == 1

    empty_meta = _copy_run(run_dir, tmp_path / "empty-meta")
    (empty_meta / "ckpt-00000004" / "meta.json").write_text("")
    assert exit_of([*resume, "--out", str(empty_meta)], "metadata") == 1

    other_spec = _copy_run(run_dir, tmp_path / "other-spec")
    other = ["train", OTHER_SPEC, *TINY, "--data", str(corpus), "--steps", "6", "--resume", "--out", str(other_spec)]
    assert exit_of(other, "does not match") == 1
    other_size = _copy_run(run_dir, tmp_path / "other-size")
    assert exit_of([*resume, "--out", str(other_size), "--set", "d=32"], "does not match") == 1
    assert exit_of(["eval", OTHER_SPEC, "--set", "d=16", "--ckpt", str(run_dir), "--task", "memorize"], "match") == 1

    assert exit_of([*resume, "--out", str(tmp_path / "nothing")], "no checkpoint") == 2
    assert exit_of(["eval", SPEC, "--set", "d=16", "--ckpt", str(tmp_path / "nope"), "--task", "mqar"], "not") == 2


# ---- kill -9 ----------------------------------------------------------------------------------------------------

# `nestc train` with a slow disk at one checkpoint: its tensors are written, then the writer waits before the
# metadata, so a kill lands inside the write.
SLOW_SAVE = """
import os, sys, time
from nestc_runtime.training import checkpoint
write = checkpoint._write_tensors
def slow(path, tensors):
    write(path, tensors)
    if f"ckpt-{int(os.environ['NESTC_TEST_SLOW_STEP']):08d}" in str(path):
        time.sleep(60)
checkpoint._write_tensors = slow
from nestc.cli import main
sys.exit(main(sys.argv[1:]))
"""
KILL_ARGS = ["--steps", "8", "--set", "train.ckpt_every=2", "--set", "train.log_every=1"]


def _train_process(out: Path, corpus: Path, slow_step: int) -> subprocess.Popen[bytes]:
    args = ["train", SPEC, *TINY, "--data", str(corpus), *KILL_ARGS, "--out", str(out)]
    env = {**os.environ, "NESTC_TEST_SLOW_STEP": str(slow_step), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *args], env=env, stderr=subprocess.PIPE)


def _kill_while_writing(out: Path, corpus: Path, step: int) -> None:
    """Start a run and SIGKILL it while it writes the checkpoint of `step`."""
    process = _train_process(out, corpus, slow_step=step)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if list(out.glob(f".ckpt-{step:08d}.tmp-*")) and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                break
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            time.sleep(0.02)
        else:
            pytest.fail("the run never reached the checkpoint write")
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_mid_write_loses_only_the_steps_since_the_last_checkpoint(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = tmp_path / "whole"
    assert main(["train", SPEC, *TINY, "--data", str(corpus), *KILL_ARGS, "--out", str(whole)]) == 0
    killed = tmp_path / "killed"
    _kill_while_writing(killed, corpus, step=6)
    # the half-written checkpoint is not a checkpoint; the previous one is complete and loadable
    assert list(killed.glob(".ckpt-00000006.tmp-*")) and not (killed / "ckpt-00000006").exists()
    latest = CheckpointManager(killed).latest()
    assert latest is not None and latest.name == "ckpt-00000004"
    assert load_checkpoint(latest)[1]["step"] == 4  # steps 5 and 6 are the only ones lost
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 6 and max(logged) - 4 <= 2  # at most ckpt_every steps lost
    # resuming ends exactly where the uninterrupted run ended, and clears the half-written temporary
    assert main(["train", SPEC, *TINY, "--data", str(corpus), *KILL_ARGS, "--out", str(killed), "--resume"]) == 0
    assert not list(killed.glob(".ckpt-*.tmp-*"))
    ours, theirs = load_checkpoint(killed / "ckpt-00000008")[0], load_checkpoint(whole / "ckpt-00000008")[0]
    model_keys = [k for k in theirs if k.startswith("model.")]
    assert model_keys and all(torch.equal(ours[k], theirs[k]) for k in model_keys)
    assert [json.loads(line)["loss"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(line)["loss"] for line in (whole / "metrics.jsonl").read_text().splitlines()
    ]

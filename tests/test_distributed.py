"""Several processes: `torchrun --nproc-per-node 2 -m nestc train` (DDP, gloo, CPU) equals one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nestc_runtime import RuntimeInputError
from nestc_runtime.training import BatchSampler
from nestc_runtime.training.distributed import DistEnv, ShardedSampler, env_from

ROOT = Path(__file__).parents[1]
SPEC = str(ROOT / "specs" / "deltanet.nest")
TRAIN = ["train", SPEC, "--set", "d=16", "--steps", "3", "--batch", "4", "--seq-len", "16", "--no-progress"]


def test_env_from_variables() -> None:
    assert env_from({}) == DistEnv(1, 0, 0)
    env = env_from({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert env.active and not env.is_main
    with pytest.raises(RuntimeInputError):
        env_from({"WORLD_SIZE": "2", "RANK": "2"})


def test_sharded_sampler_splits_the_global_batch() -> None:
    tokens = torch.arange(500) % 256
    whole = BatchSampler(tokens, 4, 8, seed=3).next()
    halves = [ShardedSampler(BatchSampler(tokens, 4, 8, seed=3), DistEnv(2, r, r)).next() for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    with pytest.raises(RuntimeInputError, match="split evenly"):
        ShardedSampler(BatchSampler(tokens, 3, 8), DistEnv(2, 0, 0))


def _torchrun() -> list[str] | None:
    script = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return [script] if script else None


def test_two_processes_match_one(tmp_path: Path) -> None:
    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the nested learning compiler trains levels at their own frequencies. " * 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run(
        [sys.executable, "-m", "nestc", *TRAIN, "--data", str(corpus), "--out", str(tmp_path / "one"), "--format",
         "json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [*torchrun, "--standalone", "--nproc-per-node", "2", "-m", "nestc", *TRAIN, "--data", str(corpus),
         "--out", str(tmp_path / "two"), "--format", "json"],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    single = json.loads(one.stdout.strip().splitlines()[-1])
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    double = json.loads(lines[0])
    assert double["processes"] == 2
    assert double["first_loss"] == pytest.approx(single["first_loss"], rel=1e-4)
    assert double["last_loss"] == pytest.approx(single["last_loss"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "ckpt-00000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "ckpt-00000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("model."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())

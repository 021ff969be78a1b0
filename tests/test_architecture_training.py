"""End to end: each shipped architecture trains for 30 CPU steps on real text through `nestc train`
(2 layers, d = 64, T = 64, batch 4), and its loss falls (mean of the last 5 steps at least 0.1 below the
first 5). Each run prints its wall time against the 60 s budget (not asserted: shared CPUs make it flaky)."""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

import pytest

from nestc.cli import main

ROOT = Path(__file__).parents[1]
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "json"  # real text on every machine with Python
RUNNING = ["transformer", "titans_lmm", "titans_mal", "titans_mag", "titans_selfmod", "hope", "hope_attention"]
BUDGET_S = 60.0
STEPS = 30


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        *RUNNING,
        "titans_mac",
    ],
)
def test_thirty_steps_lower_the_loss(spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["train", str(ROOT / "specs" / f"{spec}.nest"), "--data", str(CORPUS), "--steps", str(STEPS)]
    args += ["--out", str(out), "--batch", "4", "--seq-len", "64", "--no-progress", "--format", "json", "--set", "d=64"]
    args += ["--set", "layers=2", "--set", "train.log_every=1"]
    began = time.perf_counter()
    assert main(args) == 0
    elapsed = time.perf_counter() - began
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{spec}: {STEPS} steps in {elapsed:.1f} s (budget {BUDGET_S:.0f} s), loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.1, (first, last)
    assert Path(summary["checkpoint"]).is_dir() and (out / "plan.json").is_file()

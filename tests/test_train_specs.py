"""End to end: each first-slice spec trains for 40 CPU steps on real text through `nestc train`, and its
loss falls."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from nestc.cli import main

ROOT = Path(__file__).parents[1]
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "json"  # real text on every machine with Python


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["linear_attention", "deltanet", "gated_deltanet"])
def test_forty_steps_lower_the_loss(spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["train", str(ROOT / "specs" / f"{spec}.nest"), "--data", str(CORPUS), "--steps", "40"]
    args += ["--out", str(out), "--batch", "4", "--seq-len", "64", "--no-progress", "--format", "json", "--set", "d=32"]
    args += ["--set", "train.log_every=1"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert Path(summary["checkpoint"]).is_dir() and (out / "plan.json").is_file()

"""Evaluation tasks: oracle and random scorers, `nestc train --task` and `nestc eval` end to end, bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nestc.cli import main
from nestc_runtime.evaluation import (
    TASKS,
    TaskSampler,
    evaluate,
    get_task,
    oracle_predictor,
    random_predictor,
    resolve_checkpoint,
)
from nestc_runtime.training import EOD

ROOT = Path(__file__).parents[1]
SPEC = str(ROOT / "specs" / "deltanet.nest")
TINY = ["--set", "d=16"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def make_task(name: str, text_file: Path) -> object:
    return get_task(name, path=text_file) if name == "ppl" else get_task(name)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "mqar"
    args = ["train", SPEC, *TINY, "--task", "mqar", "--steps", "2", "--batch", "2", "--seq-len", "32"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("name", sorted(TASKS))
def test_oracle_scores_100_and_random_about_chance(name: str, text_file: Path) -> None:
    task = make_task(name, text_file)
    oracle = evaluate(oracle_predictor(), task)  # type: ignore[arg-type]
    assert oracle["score"]["accuracy"] == pytest.approx(1.0)
    randomly = evaluate(random_predictor(seed=1), task)  # type: ignore[arg-type]
    assert randomly["score"]["accuracy"] < 5 * randomly["chance"] + 0.02
    if name == "continual":
        assert oracle["score"]["forgetting"] == pytest.approx(0.0)
    if name == "ppl":
        assert oracle["score"]["ppl"] == pytest.approx(1.0, abs=1e-6)
        assert randomly["score"]["ppl"] > 100
    if name == "memorize":
        assert oracle["score"]["second_loss"] < 1e-6 < randomly["score"]["second_loss"]


def test_examples_are_bytes_with_eod_and_deterministic() -> None:
    for name in ("mqar", "niah", "continual", "memorize"):
        task = get_task(name)
        first = task.examples(torch.Generator().manual_seed(3))
        again = task.examples(torch.Generator().manual_seed(3))
        assert [e.tokens for e in first] == [e.tokens for e in again]
        for example in first:
            assert example.tokens[-1] == EOD and all(0 <= t < 256 for t in example.tokens[:-1])
            assert all(0 < p < len(example.tokens) - 1 for ps in example.spans.values() for p in ps)


def test_mqar_rows_by_pairs_and_niah_by_length_and_depth() -> None:
    mqar = evaluate(oracle_predictor(), get_task("mqar"))
    assert [row["pairs"] for row in mqar["rows"]] == [2, 4, 8]
    niah = evaluate(oracle_predictor(), get_task("niah"))
    assert {(row["length"], row["depth"]) for row in niah["rows"]} == {
        (n, d) for n in (64, 128, 256) for d in (0.0, 0.5, 1.0)
    }


@pytest.mark.parametrize("name", ["mqar", "niah", "continual", "memorize"])
def test_per_group_sets_the_examples_of_every_row(name: str) -> None:
    """`--examples N` (per_group): every row of the table rests on N examples; the rows stay the same."""
    default = get_task(name).examples(torch.Generator().manual_seed(0))
    tripled = get_task(name, per_group=3 * get_task(name).per_group).examples(torch.Generator().manual_seed(0))
    assert len(tripled) == 3 * len(default)
    assert {tuple(e.group.items()) for e in tripled} == {tuple(e.group.items()) for e in default}


def test_task_sampler_resumes_exactly() -> None:
    sampler = TaskSampler(get_task("continual"), 2, 48, seed=5)
    sampler.next()
    saved = sampler.state_dict()
    expected = sampler.next()
    other = TaskSampler(get_task("continual"), 2, 48, seed=0)
    other.load_state_dict(saved)
    assert torch.equal(other.next(), expected) and expected.shape == (2, 49)


@pytest.mark.parametrize("name", ["mqar", "niah", "continual", "memorize"])
def test_task_sampler_aligns_document_starts_across_rows(name: str) -> None:
    """Rows get documents of the same lengths (so chunked memories keep whole chunks) but different contents,
    and the lengths still vary from batch to batch."""
    sampler = TaskSampler(get_task(name), 4, 96, seed=3)
    starts_seen = set()
    for _ in range(3):
        batch = sampler.next()
        ends = [tuple((row == EOD).nonzero().flatten().tolist()) for row in batch]
        assert len(set(ends)) == 1, f"{name}: document ends differ across rows: {ends}"
        assert len({tuple(row.tolist()) for row in batch}) == 4, f"{name}: rows repeat each other"
        starts_seen.add(ends[0])
    assert len(starts_seen) > 1, f"{name}: every batch has the same document lengths"


@pytest.mark.parametrize("name", ["niah", "continual", "memorize"])
def test_train_on_each_task(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", SPEC, *TINY, "--task", name, "--steps", "2", "--batch", "2", "--seq-len", "32"]
    assert main([*args, "--out", str(tmp_path), "--no-progress", "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and Path(summary["checkpoint"]).is_dir()
    meta = json.loads((Path(summary["checkpoint"]) / "meta.json").read_text())
    assert meta["extra"]["task"] == name


def test_task_training_resumes_bit_for_bit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both sampler generators (contents and sizes) travel in the checkpoint: 2 + 2 steps == 4 steps
    (a constant schedule, since the first part is a run of 2 steps)."""
    args = ["train", SPEC, *TINY, "--task", "mqar", "--batch", "2", "--seq-len", "32", "--no-progress"]
    args += ["--set", "train.log_every=1", "--set", "optim.schedule=constant"]  # the split run ends at 2
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "split")]) == 0
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "split"), "--resume"]) == 0
    capsys.readouterr()

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    assert len(losses("whole")) == 4 and losses("split") == losses("whole")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_each_task_end_to_end(
    name: str, run_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    extra = ["--data", str(text_file)] if name == "ppl" else []
    code = main(["eval", SPEC, *TINY, "--ckpt", str(run_dir), "--task", name, *extra, "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "score:" in text
    result = json.loads(out.read_text())
    assert result["task"] == name and result["rows"] and 0.0 <= result["score"]["accuracy"] <= 1.0
    assert result["checkpoint"].endswith("ckpt-00000002")


def test_ppl_context_scores_separate_pieces(
    run_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--context N` cuts the held-out text into pieces of N tokens, each scored from a fresh state (the
    first token of a piece has no context and is not scored)."""
    whole = get_task("ppl", path=text_file).examples(torch.Generator())
    pieces = get_task("ppl", path=text_file, context=16).examples(torch.Generator())
    assert len(whole) == 1 and len(pieces) == -(-(len(whole[0].tokens) - 1) // 16)
    assert [t for piece in pieces for t in piece.tokens] == whole[0].tokens
    assert all(2 <= len(piece.tokens) <= 16 for piece in pieces)
    out = tmp_path / "ppl.json"
    base = ["eval", SPEC, *TINY, "--ckpt", str(run_dir), "--task", "ppl", "--data", str(text_file)]
    assert main([*base, "--context", "16", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["tokens"] == sum(len(p.spans["text"]) for p in pieces)
    assert main(["eval", SPEC, *TINY, "--ckpt", str(run_dir), "--task", "mqar", "--context", "16"]) == 2
    assert "--context applies to --task ppl" in capsys.readouterr().err
    assert main([*base, "--examples", "4"]) == 2
    assert "--examples applies to the generated tasks" in capsys.readouterr().err


def test_eval_json_format_and_ckpt_folder(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = resolve_checkpoint(run_dir)
    assert main(["eval", SPEC, *TINY, "--ckpt", str(ckpt), "--task", "mqar", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"]["accuracy"] >= 0.0
    assert (
        main(["eval", SPEC, *TINY, "--ckpt", str(ckpt), "--task", "mqar", "--examples", "2", "--format", "json"]) == 0
    )
    assert [row["examples"] for row in json.loads(capsys.readouterr().out)["rows"]] == [2, 2, 2]


def test_eval_bad_checkpoints(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", SPEC, "--task", "mqar", "--ckpt"]
    assert main([*base, str(tmp_path / "missing"), *TINY]) == 2  # missing: usage
    assert main([*base, str(tmp_path), *TINY]) == 2  # a folder without checkpoints
    assert main([*base, str(run_dir), "--set", "d=32"]) == 1  # another size
    err = capsys.readouterr().err
    assert "does not match" in err and "Traceback" not in err
    broken = tmp_path / "ckpt-00000001"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    assert main([*base, str(broken), *TINY]) == 1  # corrupt
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert main(["eval", SPEC, *TINY, "--ckpt", str(run_dir), "--task", "ppl"]) == 2  # ppl needs --data
    assert main(["train", SPEC, *TINY, "--steps", "1", "--out", str(tmp_path / "x")]) == 2  # no --data/--task

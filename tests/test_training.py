"""Tests of training: byte data, the loss, the loop, atomic checkpoints and bit-exact resume."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nestc_runtime.errors import RuntimeInputError
from nestc_runtime.training import (
    BYTE_VOCAB,
    EOD,
    BatchSampler,
    ByteTokenizer,
    CheckpointManager,
    CheckpointMissing,
    MetricsWriter,
    TrainSettings,
    check_compatible,
    load_checkpoint,
    load_corpus,
    loss_curve_png,
    lr_factor,
    next_token_loss,
    read_metrics,
    save_checkpoint,
    split_holdout,
    train,
    truncate_metrics,
)
from nestc_runtime.training import checkpoint as checkpoint_module

TEXT = (
    "the quick brown fox jumps over the lazy dog. "
    "a bird in the hand is worth two in the bush. "
    "all that glitters is not gold. "
) * 8


class Interrupted(Exception):
    """Raised by TinyLM to simulate a run killed part-way."""


class TinyLM(nn.Module):
    """Embedding, dropout (to exercise the global RNG) and a linear head over the byte vocabulary."""

    def __init__(self, dim: int = 16, seed: int = 0, fail_on_call: int | None = None, nan_on_call: int | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(BYTE_VOCAB, dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, BYTE_VOCAB)
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.nan_on_call = nan_on_call

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise Interrupted
        logits = self.head(self.drop(torch.tanh(self.embed(tokens))))
        if self.calls == self.nan_on_call:
            logits = logits * float("nan")
        return logits


def groups_for(model: TinyLM) -> list[dict[str, Any]]:
    """Two groups of different kinds, so both optimizers' states go through the checkpoint."""
    return [
        {"name": "embed", "kind": "adamw", "params": list(model.embed.parameters()), "lr": 3e-2,
         "weight_decay": 0.01, "betas": [0.9, 0.99]},
        {"name": "head", "kind": "sgd", "params": list(model.head.parameters()), "lr": 0.3,
         "weight_decay": 0.0, "momentum": 0.9},
    ]  # fmt: skip


def text_tokens() -> torch.Tensor:
    return torch.tensor(ByteTokenizer().encode(TEXT) + [EOD], dtype=torch.long)


def run(out: Path, steps: int, *, resume: bool = False, model: TinyLM | None = None, **settings: Any) -> dict:
    model = model if model is not None else TinyLM()
    options: dict[str, Any] = {"steps": steps, "batch": 4, "seq_len": 16, "log_every": 1, "warmup": 2}
    options.update(settings)
    sampler = BatchSampler(text_tokens(), options["batch"], options["seq_len"], seed=7)
    return train(model, groups_for(model), sampler, TrainSettings(**options), out, resume=resume, progress=False)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]


# --- data ---------------------------------------------------------------------------------------------------


def test_tokenizer_round_trip() -> None:
    tokenizer = ByteTokenizer()
    text = "héllo, wörld → ✓"
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([104, EOD, 105]) == "hi"
    assert tokenizer.decode([0xFF]) == "\ufffd"
    assert tokenizer.vocab_size == 257


def test_corpus_from_folder(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b" / "c.md").write_text("sécond", encoding="utf-8")
    (tmp_path / "b" / "image.bin").write_bytes(b"\x89PNG\x00\x01\xff\xfe")
    (tmp_path / ".hidden").write_text("secret", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    tokens = load_corpus(tmp_path)
    encode = ByteTokenizer().encode
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokens.tolist() == encode("first") + [EOD] + encode("sécond") + [EOD]


def test_corpus_single_file_and_byte_cap(tmp_path: Path) -> None:
    file = tmp_path / "doc.txt"
    file.write_text("aé" * 10, encoding="utf-8")  # 30 bytes
    assert load_corpus(file).tolist() == ByteTokenizer().encode("aé" * 10) + [EOD]
    capped = load_corpus(file, max_bytes=5)  # cut inside "é": trimmed to a character boundary
    assert capped.tolist() == ByteTokenizer().encode("aéa") + [EOD]


def test_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeInputError, match="not found") as missing:
        load_corpus(tmp_path / "nope")
    assert missing.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeInputError, match="empty"):
        load_corpus(tmp_path / "empty")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02")
    with pytest.raises(RuntimeInputError, match="not UTF-8"):
        load_corpus(binary)


def test_too_short_corpus() -> None:
    with pytest.raises(RuntimeInputError, match="fewer than seq_len") as error:
        BatchSampler(torch.arange(10), batch=2, seq_len=10)
    assert error.value.hint


def test_sampler_is_deterministic_and_resumable() -> None:
    tokens = text_tokens()
    first = BatchSampler(tokens, 3, 8, seed=1)
    second = BatchSampler(tokens, 3, 8, seed=1)
    assert torch.equal(first.next(), second.next())
    state = first.state_dict()
    expected = [first.next() for _ in range(3)]
    restored = BatchSampler(tokens, 3, 8, seed=99)
    restored.load_state_dict(state)
    assert all(torch.equal(a, restored.next()) for a in expected)
    window = first.next()
    assert window.shape == (3, 9)
    crops = tokens.unfold(0, 9, 1)  # every contiguous window of 9 tokens
    assert all(bool((crops == row).all(dim=1).any()) for row in window)


def test_split_holdout() -> None:
    head, tail = split_holdout(torch.arange(100), 0.1)
    assert head.tolist() == list(range(90)) and tail.tolist() == list(range(90, 100))
    assert split_holdout(torch.arange(5), 0.0)[1].numel() == 0
    with pytest.raises(RuntimeInputError):
        split_holdout(torch.arange(5), 1.0)


def test_next_token_loss_ignores_positions_after_eod() -> None:
    torch.manual_seed(0)
    window = torch.tensor([[65, EOD, 66, 67, 68]])
    logits = torch.randn(1, 4, BYTE_VOCAB)
    log_probs = torch.log_softmax(logits[0], dim=-1)
    labels = [EOD, 66, 67, 68]
    expected = -sum(log_probs[i, labels[i]].item() for i in (0, 2, 3)) / 3  # input at 1 is EOD: no label
    assert next_token_loss(logits, window, EOD).item() == pytest.approx(expected, rel=1e-6)


# --- the loop ---------------------------------------------------------------------------------------------


def test_settings_forbid_unknown_keys() -> None:
    with pytest.raises(ValueError):
        TrainSettings(steps=3, learning_rate=1.0)  # type: ignore[call-arg]
    assert TrainSettings(steps=3).batch == 8


def test_lr_schedule() -> None:
    settings = TrainSettings(steps=10, warmup=2)
    assert lr_factor(1, settings) == pytest.approx(0.5)
    assert lr_factor(3, settings) == pytest.approx(1.0)
    assert lr_factor(10, settings) == pytest.approx(0.1)
    assert lr_factor(7, TrainSettings(steps=10, schedule="constant")) == 1.0


def test_forty_steps_lower_the_loss(tmp_path: Path) -> None:
    result = run(tmp_path, 40, log_every=10, batch=8, seq_len=32)
    assert result["steps"] == 40 and result["tokens_per_s"] > 0
    assert result["last_loss"] < result["first_loss"] - 1.0
    assert [step for step, _ in losses(tmp_path)] == [10, 20, 30, 40]
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert set(record) == {"step", "loss", "tokens_per_s", "lr", "elapsed_s"}
    assert Path(result["checkpoint"]).name == "ckpt-00000040"
    tensors, meta = load_checkpoint(result["checkpoint"])
    assert meta["step"] == 40 and "model.embed.weight" in tensors and "optim.embed.0.exp_avg" in tensors
    assert "optim.head.0.momentum_buffer" in tensors and "sampler.generator" in tensors


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    whole = TinyLM()
    reference = run(tmp_path / "whole", 10, ckpt_every=5, model=whole)

    interrupted = tmp_path / "parts"
    with pytest.raises(Interrupted):  # dies in step 8, after the checkpoint of step 5
        run(interrupted, 10, ckpt_every=5, model=TinyLM(fail_on_call=8))
    assert [step for step, _ in losses(interrupted)] == [1, 2, 3, 4, 5, 6, 7]
    resumed_model = TinyLM(seed=123)  # different initial weights: the checkpoint must replace them
    resumed = run(interrupted, 10, ckpt_every=5, resume=True, model=resumed_model)

    assert losses(interrupted) == losses(tmp_path / "whole")
    assert len(losses(interrupted)) == 10
    assert resumed["last_loss"] == reference["last_loss"]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_with_more_steps_and_constant_schedule(tmp_path: Path) -> None:
    run(tmp_path / "whole", 10, schedule="constant")
    run(tmp_path / "parts", 5, schedule="constant")
    run(tmp_path / "parts", 10, schedule="constant", resume=True)
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


def test_resume_and_fresh_run_guards(tmp_path: Path) -> None:
    with pytest.raises(CheckpointMissing):
        run(tmp_path, 3, resume=True)
    run(tmp_path, 3)
    with pytest.raises(RuntimeInputError, match="already holds checkpoints"):
        run(tmp_path, 3)
    model = TinyLM()
    sampler = BatchSampler(text_tokens(), 4, 16, seed=7)
    with pytest.raises(RuntimeInputError, match="spec_hash"):
        train(model, groups_for(model), sampler, TrainSettings(steps=4, batch=4, seq_len=16), tmp_path,
              resume=True, progress=False, extra_meta={"spec_hash": "abc"})  # fmt: skip


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(RuntimeInputError, match="loss became NaN at step 5") as error:
        run(tmp_path, 10, ckpt_every=2, model=TinyLM(nan_on_call=5))
    assert error.value.hint and "ckpt-00000004" in error.value.hint
    latest = CheckpointManager(tmp_path).latest()
    assert latest is not None and latest.name == "ckpt-00000004"
    assert load_checkpoint(latest)[1]["step"] == 4


# --- checkpoints ------------------------------------------------------------------------------------------


def small_state(value: float) -> tuple[dict[str, torch.Tensor], dict]:
    base = torch.full((3, 4), value)
    return {"w": base, "row": base[1], "scalar": torch.tensor(value)}, {"step": int(value), "name": "x"}


def test_checkpoint_round_trip_with_shared_storage(tmp_path: Path) -> None:
    tensors, meta = small_state(2.0)
    save_checkpoint(tmp_path / "c", tensors=tensors, meta=meta)
    loaded, loaded_meta = load_checkpoint(tmp_path / "c")
    assert loaded_meta == meta
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["meta.json", "model.safetensors"]


def test_killed_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, *small_state(1.0))
    save_checkpoint(tmp_path / "single", tensors=small_state(1.0)[0], meta={"step": 1})

    def killed(tensors: dict, filename: str) -> None:
        assert Path(filename).parent.name.startswith(".")  # inside the temporary sibling directory
        Path(filename).write_bytes(b"partial")
        raise OSError("killed mid-write")

    monkeypatch.setattr(checkpoint_module, "save_file", killed)
    with pytest.raises(OSError, match="killed"):
        manager.save(2, *small_state(2.0))
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path / "single", tensors=small_state(2.0)[0], meta={"step": 2})
    monkeypatch.undo()

    latest = manager.latest()
    assert latest is not None and latest.name == "ckpt-00000001"
    assert load_checkpoint(latest)[1]["step"] == 1
    assert load_checkpoint(tmp_path / "single")[1] == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "single"]


def test_manager_keeps_the_newest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save(step, *small_state(float(step)))
    (tmp_path / ".ckpt-00000009.tmp-stale").mkdir()  # a temporary left by a killed save is ignored
    (tmp_path / "ckpt-00000010").mkdir()  # incomplete: no files
    assert [p.name for p in manager.checkpoints()] == ["ckpt-00000002", "ckpt-00000003"]
    latest = manager.latest()
    assert latest is not None and latest.name == "ckpt-00000003"


def test_corrupt_and_missing_checkpoints(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", tensors=small_state(1.0)[0], meta={"step": 1})
    weights = tmp_path / "c" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeInputError, match="corrupt") as truncated:
        load_checkpoint(tmp_path / "c")
    assert not isinstance(truncated.value, CheckpointMissing)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(RuntimeInputError, match="corrupt"):
        load_checkpoint(tmp_path / "c")

    save_checkpoint(tmp_path / "d", tensors=small_state(1.0)[0], meta={"step": 1})
    (tmp_path / "d" / "meta.json").write_text('{"step": 1', encoding="utf-8")
    with pytest.raises(RuntimeInputError, match="metadata") as bad_meta:
        load_checkpoint(tmp_path / "d")
    assert bad_meta.value.hint

    with pytest.raises(CheckpointMissing):
        load_checkpoint(tmp_path / "absent")
    (tmp_path / "d" / "meta.json").unlink()
    with pytest.raises(CheckpointMissing, match="meta.json"):
        load_checkpoint(tmp_path / "d")


def test_check_compatible_names_the_key() -> None:
    meta = {"spec_hash": "abc", "d": 128}
    check_compatible(meta, {"spec_hash": "abc", "d": 128})
    with pytest.raises(RuntimeInputError, match=r"\bd is 128 there but 64 here"):
        check_compatible(meta, {"spec_hash": "abc", "d": 64})
    with pytest.raises(RuntimeInputError, match="vocab"):
        check_compatible(meta, {"vocab": 257})


# --- metrics ----------------------------------------------------------------------------------------------


def test_metrics_writer_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as writer:
        for step in (1, 2, 3):
            writer.write({"step": step, "loss": 1.0 / step})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 4, "lo')  # a line cut short by a crash
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()[:3]] == [1, 2, 3]
    truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert math.isclose(read_metrics(path)[1]["loss"], 0.5)


def test_loss_curve_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"step": 1, "loss": 2.0})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert loss_curve_png(path, tmp_path / "loss.png") is False
    assert not (tmp_path / "loss.png").exists()

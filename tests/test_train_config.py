"""`nestc train --config/--print-config/--set` precedence, config errors at file:line:col, and the tokenizers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from nestc.cli import main
from nestc.train_config import tomllib
from nestc_runtime.evaluation.tasks import Perplexity
from nestc_runtime.training import load_corpus
from nestc_runtime.training.checkpoint import CheckpointManager, load_checkpoint
from nestc_runtime.training.tokenizers import TiktokenTokenizer, TokenizerUnavailable, get_tokenizer

ROOT = Path(__file__).parents[1]
SPEC = str(ROOT / "specs" / "deltanet.nest")
HOPE = str(ROOT / "specs" / "hope.nest")
TINY = ["--set", "d=16", "--set", "heads=2", "--set", "layers=1"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def printed(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, dict[str, Any]]:
    code, out, err = run(capsys, "train", SPEC, "--print-config", *args)
    assert code == 0, err
    return out, tomllib.loads(out)


# ---- --print-config, --config and precedence ---------------------------------------------------------------


def test_print_config_round_trips_through_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text, data = printed(capsys, "--set", "d=32", "--set", "optim.lr=0.002", "--set", "optim.warmup=5", "--batch", "4")
    assert data["train"]["batch"] == 4 and data["train"]["steps"] == 1000 and data["train"]["tokenizer"] == "byte"
    assert data["optim"]["lr"] == 0.002 and data["optim"]["warmup"] == 5
    assert data["spec"] == {"d": 32, "heads": 2, "layers": 2, "vocab": 257}
    assert "weight_decay" not in data["optim"]  # unset (None): a comment, since TOML has no null
    saved = tmp_path / "run.toml"
    saved.write_text(text)
    again, _ = printed(capsys, "--config", str(saved))
    assert again == text


def test_print_config_round_trips_words_and_lists(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, text, err = run(
        capsys, "train", HOPE, "--print-config", "--set", "mem_read=boundary", "--set", "chunks=[8,32]"
    )
    assert code == 0, err
    assert tomllib.loads(text)["spec"]["chunks"] == [8, 32] and 'mem_read = "boundary"' in text
    saved = tmp_path / "hope.toml"
    saved.write_text(text)
    assert run(capsys, "train", HOPE, "--config", str(saved), "--print-config")[:2] == (0, text)


def test_precedence_defaults_config_set_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        "[train]\nbatch = 4\nseq_len = 32\nsteps = 7\n\n[optim]\nlr = 0.01\nschedule = 'constant'\n\n"
        "[spec]\nd = 32\nlayers = 1\n"
    )
    _, data = printed(
        capsys, "--config", str(config), "--set", "train.batch=6", "--set", "train.steps=9", "--set", "d=48",
        "--batch", "8",
    )  # fmt: skip
    assert data["train"]["batch"] == 8  # flag > --set > config
    assert data["train"]["steps"] == 9  # --set > config
    assert data["train"]["seq_len"] == 32  # config > default
    assert data["train"]["seed"] == 0  # default
    assert data["optim"] == {"lr": 0.01, "warmup": 0, "schedule": "constant", "grad_clip": 1}
    assert data["spec"]["d"] == 48 and data["spec"]["layers"] == 1  # --set > [spec] > the spec's own


def test_config_file_drives_a_training_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    config = tmp_path / "run.toml"
    config.write_text("[train]\nsteps = 2\nbatch = 2\nseq_len = 16\nseed = 3\n\n[spec]\nd = 16\nlayers = 1\n")
    out = tmp_path / "run"
    code, stdout, err = run(
        capsys, "train", SPEC, "--config", str(config), "--data", str(corpus), "--out", str(out), "--no-progress",
        "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 2
    _, meta = load_checkpoint(CheckpointManager(out).latest())  # type: ignore[arg-type]
    assert meta["settings"]["seed"] == 3 and meta["settings"]["seq_len"] == 16
    assert meta["extra"]["params"]["d"] == 16 and meta["extra"]["tokenizer"] == "byte"


BAD_CONFIGS = [
    ("[train]\nbatch = 4\nbatchh = 2\n", 3, 1, "unknown run setting `train.batchh`", "did you mean `batch`?"),
    ("[train]\n  lr = 0.1\n", 2, 3, "unknown run setting `train.lr`", "`lr` belongs in [optim]"),
    ("[optim]\nlr = 0.1\n\n[trian]\nsteps = 3\n", 4, 1, "unknown table or key `trian`", "[train], [optim]"),
    ("steps = 3\n", 1, 1, "unknown table or key `steps`", "[train], [optim]"),
    ("[train]\nbatch = 'many'\n", 2, 1, "run setting `train.batch`: Input should be a valid integer", None),
    ("[optim]\nlr = -1.0\n", 2, 1, "run setting `optim.lr`: Input should be greater than 0", None),
    ("[train]\nbatch = = 4\n", 2, 9, "not valid TOML", None),
    ("[spec]\nlayer = 1\n", 2, 1, "[spec] `layer` names no parameter of the spec", "did you mean `layers`?"),
    ("[spec]\nd = true\n", 2, 1, "spec parameter `d` must be a number, a word or a list of numbers", None),
]


@pytest.mark.parametrize(("text", "line", "col", "message", "hint"), BAD_CONFIGS)
def test_bad_config_is_an_input_error_at_its_line_and_column(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, line: int, col: int, message: str, hint: str | None
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    code, _, err = run(capsys, "train", SPEC, "--config", str(config), "--print-config")
    assert code == 1, err
    first, *rest = err.splitlines()
    assert first.startswith(f"error: {config}:{line}:{col}: {message}"), first
    caret = next(row for row in rest if row.strip().startswith("|") and "^" in row)
    assert caret.index("^") - caret.index("|") - 2 == col - 1  # the caret sits under the column
    assert "Traceback" not in err
    if hint:
        assert hint in err


def test_usage_errors_of_config_and_set(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", SPEC, "--config", str(tmp_path / "missing.toml"), "--print-config")
    assert code == 2
    code, _, err = run(capsys, "train", SPEC, "--set", "train.lr=0.1", "--print-config")
    assert code == 2 and "use --set optim.lr=0.1" in err
    code, _, err = run(capsys, "train", SPEC, "--set", "optim.lrr=0.1", "--print-config")
    assert code == 2 and "did you mean `lr`?" in err
    code, _, err = run(capsys, "train", SPEC, "--set", "train.batch=0", "--print-config")
    assert code == 2 and "--set train.batch" in err
    code, _, err = run(capsys, "train", SPEC, "--print-config", "--set", "d=32", "--format", "json")
    assert code == 0  # --print-config needs neither --data nor --out
    code, _, err = run(capsys, "train", SPEC, "--data", SPEC)
    assert code == 2 and "--out" in err


# ---- tokenizers ------------------------------------------------------------------------------------------


def test_tokenizer_errors_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, "train", SPEC, "--print-config", "--tokenizer", "sentencepiece")
    assert code == 2 and "--tokenizer" in err
    with pytest.raises(TokenizerUnavailable, match="unknown tokenizer"):
        get_tokenizer("tiktoken:")
    pytest.importorskip("tiktoken")
    code, _, err = run(capsys, "train", SPEC, "--print-config", "--tokenizer", "tiktoken:no_such_encoding")
    assert code == 2 and "unknown tiktoken encoding 'no_such_encoding'" in err and "cl100k_base" in err

    def offline(name: str) -> Any:
        raise ConnectionError("no network")

    monkeypatch.setattr("tiktoken.get_encoding", offline)
    code, _, err = run(capsys, "train", SPEC, "--print-config", "--tokenizer", "tiktoken:gpt2")
    assert code == 2 and "could not load the encoding 'gpt2' (ConnectionError)" in err and "TIKTOKEN_CACHE_DIR" in err
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # not installed: the import fails
    code, _, err = run(capsys, "train", SPEC, "--print-config", "--tokenizer", "tiktoken:gpt2")
    assert code == 2 and "needs the tiktoken package" in err and "nestc[tiktoken]" in err


def tiny_encoding() -> Any:
    """A real tiktoken Encoding with a tiny vocabulary (every byte plus three merges), built offline."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"he", b"the"):
        ranks[merge] = len(ranks)
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="tiny", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


def test_tiktoken_tokenizer_encodes_decodes_and_counts_bytes() -> None:
    tokenizer = TiktokenTokenizer("tiny", tiny_encoding())
    ids = tokenizer.encode("the theme é <|endoftext|>")
    assert 258 in ids and tokenizer.vocab_size == 260 and tokenizer.eod == 259  # "the" merged; eod = vocab - 1
    assert tokenizer.decode([*ids, tokenizer.eod]) == "the theme é <|endoftext|>"
    assert tokenizer.byte_length(ids) == len("the theme é <|endoftext|>".encode())
    with pytest.raises(Exception, match="outside the vocabulary"):
        tokenizer.decode([260])


def test_corpus_and_ppl_with_a_tokenizer(tmp_path: Path) -> None:
    tokenizer = TiktokenTokenizer("tiny", tiny_encoding())
    (tmp_path / "a.txt").write_text("the them")
    (tmp_path / "b.txt").write_text("hethe")
    tokens = load_corpus(tmp_path, tokenizer=tokenizer).tolist()
    assert tokens == [*tokenizer.encode("the them"), 259, *tokenizer.encode("hethe"), 259]
    example = Perplexity(tmp_path / "a.txt", tokenizer=tokenizer).examples(None)[0]  # type: ignore[arg-type]
    assert example.tokens[-1] == 259 and example.group["bytes"] == len("the them") - 3 + 1  # "the" is one token
    records = [{"group": example.group, "spans": {"text": {"correct": 1, "count": 3, "nll": 6.0}}}]
    _, headline = Perplexity(tmp_path / "a.txt", tokenizer=tokenizer).summarize(records)
    assert headline["bits_per_byte"] == pytest.approx(6.0 / example.group["bytes"] / 0.6931471805599453)


@pytest.mark.slow
def test_tiktoken_run_stores_its_tokenizer_for_eval_and_generate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoding = tiny_encoding()
    monkeypatch.setattr("tiktoken.get_encoding", lambda name: encoding)  # stands in for a cached encoding file
    corpus = tmp_path / "text.txt"
    corpus.write_text("the theme of the thesis is the heat. " * 30)
    out = tmp_path / "run"
    args = ["train", SPEC, "--data", str(corpus), "--out", str(out), "--steps", "2", "--batch", "2", "--seq-len", "16"]
    code, _, err = run(capsys, *args, *TINY, "--tokenizer", "tiktoken:gpt2", "--no-progress")
    assert code == 0, err
    _, meta = load_checkpoint(CheckpointManager(out).latest())  # type: ignore[arg-type]
    assert meta["extra"]["tokenizer"] == "tiktoken:gpt2" and meta["extra"]["params"]["vocab"] == 260
    code, out_text, err = run(capsys, "eval", SPEC, "--ckpt", str(out), "--task", "ppl", "--data", str(corpus), *TINY,
                              "--format", "json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out_text)["rows"][0]["tokens"] < len(corpus.read_bytes())  # scored in tiktoken tokens
    code, _, err = run(capsys, "eval", SPEC, "--ckpt", str(out), "--task", "mqar", *TINY)
    assert code == 2 and "byte-level" in err
    code, out_text, err = run(capsys, "generate", SPEC, "--ckpt", str(out), "--prompt", "the", "--max-tokens", "4",
                              *TINY, "--format", "json")  # fmt: skip
    assert code == 0, err
    assert all(0 <= t < 260 for t in json.loads(out_text)["tokens"])
    code, _, err = run(capsys, *args, *TINY, "--tokenizer", "tiktoken:gpt2", "--set", "vocab=300", "--print-config")
    assert code == 2 and "does not fit the tokenizer" in err
    code, _, err = run(capsys, "train", SPEC, "--task", "mqar", "--out", str(tmp_path / "t"), "--steps", "1",
                       "--tokenizer", "tiktoken:gpt2")  # fmt: skip
    assert code == 2 and "byte-level" in err


# ---- memory state of `objective task` levels -------------------------------------------------------------

TINY_HOPE = {"d": 16.0, "heads": 2.0, "layers": 1.0, "chunks": [2.0, 4.0], "c_mem": 4.0, "c_other": 2.0}


def tiny_hope() -> Any:
    import torch

    from nestc.pipeline import front_end, to_plan
    from nestc_runtime import CompiledModel

    torch.manual_seed(0)
    return CompiledModel(to_plan(front_end(HOPE, {**TINY_HOPE, "seq_len": 16.0}, None)))


@pytest.mark.slow
def test_task_level_state_reloads_exactly_by_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved mid-chunk (open leaf records), reloaded, continued: the same tokens and bit-identical state as a
    stream that never stopped; without the history (past the cap) it drifts, as documented."""
    import torch

    from nestc_runtime import generation
    from nestc_runtime.generation import flatten_state, generate, load_state, save_state

    model = tiny_hope()
    history: list[list[int]] = []
    first, state = generate(model, list(b"hello"), max_tokens=4, temperature=0, stop_at_eod=False, history=history)
    assert flatten_state(state)[1]["dropped"]  # leaf records are open: the case that needs the replay
    assert history == [list(b"hello"), *([t] for t in first)]
    path = save_state(tmp_path / "s.safetensors", model, state, history=history)
    loaded, meta = load_state(path, model)
    assert meta["history"] == history
    assert any(k.endswith("/G1") for k in flatten_state(state)[0])  # the running gradient is a saved tensor
    one, after_one = generate(model, list(b" wo"), max_tokens=5, temperature=0.8, seed=2, state=state)
    two, after_two = generate(model, list(b" wo"), max_tokens=5, temperature=0.8, seed=2, state=loaded)
    assert one == two
    a, b = flatten_state(after_one)[0], flatten_state(after_two)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setattr(generation, "MAX_REPLAY_TOKENS", 3)
    path = save_state(tmp_path / "capped.safetensors", model, state, history=history)
    capped, meta = load_state(path, model)
    assert meta["history"] is None
    _, after_capped = generate(model, list(b" wo"), max_tokens=5, temperature=0.8, seed=2, state=capped)
    c = flatten_state(after_capped)[0]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the records dropped at the save change later updates


def test_state_history_of_another_vocabulary_is_an_error(tmp_path: Path) -> None:
    from nestc_runtime.errors import RuntimeInputError
    from nestc_runtime.generation import _replay

    with pytest.raises(RuntimeInputError, match="outside the vocabulary"):
        _replay(tiny_hope(), [[1, 999]], {}, "s")
    with pytest.raises(RuntimeInputError, match="malformed"):
        _replay(tiny_hope(), [["x"]], {}, "s")

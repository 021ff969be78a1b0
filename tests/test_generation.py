"""Generation: streaming sampling, the memory state saved and reloaded exactly, bad state files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nestc.cli import main
from nestc.pipeline import front_end, to_plan
from nestc_runtime import CompiledModel, RuntimeInputError
from nestc_runtime.evaluation import load_trained
from nestc_runtime.generation import flatten_state, generate, load_state, sample_next, save_state
from nestc_runtime.training import check_compatible

ROOT = Path(__file__).parents[1]
SPEC = str(ROOT / "specs" / "deltanet.nest")
TINY = ["--set", "d=16"]


def tiny_model(d: float = 16.0, seed: int = 0) -> CompiledModel:
    torch.manual_seed(seed)
    return CompiledModel(to_plan(front_end(SPEC, {"d": d}, None)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "run"
    corpus = out.parent / "corpus.txt"
    corpus.write_text("hello world, hello nested learning. " * 30)
    args = ["train", SPEC, *TINY, "--data", str(corpus), "--steps", "2", "--batch", "2", "--seq-len", "32"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return out


def test_sample_next_greedy_and_top_k() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, gen, temperature=0) == 1
    picks = {sample_next(logits, gen, temperature=5.0, top_k=2) for _ in range(50)}
    assert picks <= {1, 3} and len(picks) == 2


def test_state_round_trip_continues_exactly(tmp_path: Path) -> None:
    model = tiny_model()
    first, state = generate(model, list(b"hello "), max_tokens=6, temperature=0.9, seed=1, stop_at_eod=False)
    assert len(first) == 6
    path = save_state(tmp_path / "state.safetensors", model, state)
    loaded, meta = load_state(path, model)
    assert meta["system"] == "deltanet"
    tensors, _ = flatten_state(state)
    again, _ = flatten_state(loaded)
    assert tensors.keys() == again.keys()
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    one, _ = generate(model, list(b"wor"), max_tokens=8, seed=7, state=state, stop_at_eod=False)
    two, _ = generate(model, list(b"wor"), max_tokens=8, seed=7, state=loaded, stop_at_eod=False)
    assert one == two
    # the state carries the stream: continuing differs from starting afresh
    fresh, _ = generate(model, list(b"wor"), max_tokens=8, temperature=0, stop_at_eod=False)
    cont, _ = generate(model, list(b"wor"), max_tokens=8, temperature=0, state=loaded, stop_at_eod=False)
    logits_fresh = model(torch.tensor([list(b"wor")]))
    logits_cont, _ = model(torch.tensor([list(b"wor")]), loaded)
    assert not torch.allclose(logits_fresh, logits_cont)
    assert len(fresh) == len(cont) == 8


def test_state_is_the_stream_of_one_process(tmp_path: Path) -> None:
    """Prompt A then prompt B with a state file in between equals A + B through one stream."""
    model = tiny_model()
    new_a, state = generate(model, list(b"abc"), max_tokens=4, temperature=0, stop_at_eod=False)
    save_state(tmp_path / "s.safetensors", model, state)
    loaded, _ = load_state(tmp_path / "s.safetensors", model)
    new_b, _ = generate(model, list(b"xy"), max_tokens=4, temperature=0, state=loaded, stop_at_eod=False)
    with torch.no_grad():
        logits = model(torch.tensor([list(b"abc") + new_a + list(b"xy")]))
    assert int(logits[0, -1].argmax()) == new_b[0]


def test_state_of_another_size_or_corrupt_is_an_error(tmp_path: Path) -> None:
    small, large = tiny_model(16.0), tiny_model(32.0)
    _, state = generate(small, list(b"hi"), max_tokens=2, temperature=0)
    path = save_state(tmp_path / "s.safetensors", small, state)
    with pytest.raises(RuntimeInputError, match="another model"):
        load_state(path, large)
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"\x07garbage")
    with pytest.raises(RuntimeInputError, match="corrupt"):
        load_state(garbage, small)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(RuntimeInputError, match="not a nestc state"):
        load_state(foreign, small)


def test_generate_command_saves_and_continues(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "memory.safetensors"
    base = ["generate", SPEC, *TINY, "--ckpt", str(run_dir), "--max-tokens", "5", "--seed", "3"]
    assert main([*base, "--prompt", "hello", "--state", str(state), "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert state.is_file() and not first["continued"] and len(first["tokens"]) <= 5
    assert main([*base, "--prompt", " world", "--state", str(state), "--format", "json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["continued"]
    # the same two calls in one process, through the API
    model = tiny_model()
    plan = model.plan
    load_trained(model, run_dir, {"system": plan.system, "source_hash": plan.source_hash, "params": plan.params})
    a, st = generate(model, list(b"hello"), max_tokens=5, seed=3)
    b, _ = generate(model, list(b" world"), max_tokens=5, seed=3, state=st)
    assert (a, b) == (first["tokens"], second["tokens"])
    assert main([*base, "--prompt", "text"]) == 0  # text output, no state file


def test_generate_command_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", SPEC, "--prompt", "hi", "--max-tokens", "2"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a state")
    assert main([*base, *TINY, "--ckpt", str(run_dir), "--state", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err
    assert main([*base, *TINY, "--ckpt", str(tmp_path / "none")]) == 2
    assert main([*base, "--set", "d=32", "--ckpt", str(run_dir)]) == 1
    assert main([*base, *TINY, "--ckpt", str(run_dir), "--temperature", "-1"]) == 2
    assert main(["generate", SPEC, *TINY, "--ckpt", str(run_dir), "--prompt", ""]) == 2


def test_every_spec_parameter_identifies_the_checkpoint() -> None:
    """Lists (CMS chunk sizes) and strings (a read mode) name another model as much as numbers do: a checkpoint
    records them all, the record survives JSON, and a changed one is refused."""
    hope = ROOT / "specs" / "hope.nest"
    trained = to_plan(front_end(hope, {"d": 32}, None)).params
    assert trained["chunks"] == [16, 64, 256] and trained["mem_read"] == "before"
    assert json.loads(json.dumps(trained)) == trained
    check_compatible({"params": json.loads(json.dumps(trained))}, {"params": trained})
    for change in ({"chunks": [8, 64, 256]}, {"mem_read": "boundary"}, {"eta_max": 0.1}):
        other = to_plan(front_end(hope, {"d": 32, **change}, None)).params
        with pytest.raises(RuntimeInputError, match="does not match"):
            check_compatible({"params": trained}, {"params": other})


def test_a_mismatch_names_the_parameter() -> None:
    """The error names the one parameter that differs (or is missing on either side), not two whole dicts."""
    trained = {"params": {"d": 32, "chunks": [16, 64]}}
    for here, needle in [
        ({"d": 32, "chunks": [8, 64]}, "params.chunks is [16, 64] there but [8, 64] here"),
        ({"d": 32, "chunks": [16, 64], "mem_read": "before"}, "does not record 'params.mem_read'"),
        ({"d": 32}, "params.chunks is [16, 64] there but absent here"),
    ]:
        with pytest.raises(RuntimeInputError, match=re.escape(needle)):
            check_compatible(trained, {"params": here})
    check_compatible(trained, {"params": {"chunks": [16.0, 64.0], "d": 32.0}})  # --set gives floats

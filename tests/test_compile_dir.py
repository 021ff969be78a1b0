"""A compiled plan directory runs with `nestc_runtime` alone, and a tampered plan is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import nestc
import nestc_runtime
from nestc.pipeline import front_end, to_plan
from nestc_runtime import RuntimeInputError

SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
SPECS = tuple(sorted(p.stem for p in SPECS_DIR.glob("*.nest")))  # every shipped spec
SIZES = {"d": 16, "heads": 2, "layers": 2}

# Runs in a fresh interpreter where importing the compiler fails.
RUNNER = textwrap.dedent(
    """
    import sys

    class NoCompiler:
        def find_spec(self, name, path=None, target=None):
            if name == "nestc" or name.startswith("nestc."):
                raise ImportError(f"the compiler is not available here: {name}")
            return None

    sys.meta_path.insert(0, NoCompiler())
    for name in list(sys.modules):
        if name == "nestc" or name.startswith("nestc."):
            del sys.modules[name]

    import torch
    import nestc_runtime
    from safetensors.torch import load_file, save_file

    try:
        import nestc  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the compiler was importable")

    plan_dir, weights, out = sys.argv[1:4]
    model = nestc_runtime.load(plan_dir)
    model.load_state_dict(load_file(weights))
    torch.manual_seed(0)
    tokens = torch.randint(0, 257, (1, 9))
    logits = model(tokens)
    print(tuple(logits.shape))
    save_file({"tokens": tokens, "logits": logits.detach().contiguous()}, out)
    assert not [m for m in sys.modules if m == "nestc" or m.startswith("nestc.")], "compiler got imported"
    """
)


def write_plan(spec: str, directory: Path) -> Path:
    path = to_plan(front_end(SPECS_DIR / f"{spec}.nest", SIZES)).save(directory)
    assert path == directory / "plan.json" and path.is_file()
    return directory


@pytest.mark.parametrize("spec", SPECS)
def test_plan_directory_runs_without_the_compiler(spec: str, tmp_path: Path) -> None:
    plan_dir = write_plan(spec, tmp_path / "compiled")
    torch.manual_seed(1)
    model = nestc_runtime.load(plan_dir)  # fresh weights, differing from any other seed's
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    out = tmp_path / "out.safetensors"

    result = subprocess.run(
        [sys.executable, str(script), str(plan_dir), str(tmp_path / "weights.safetensors"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 9, 257)"

    child = load_file(str(out))
    torch.manual_seed(0)
    tokens = torch.randint(0, 257, (1, 9))
    assert torch.equal(child["tokens"], tokens)
    expected = model(tokens).detach()
    assert torch.allclose(child["logits"], expected, rtol=1e-6, atol=1e-7)
    # A model with other weights gives other logits: the comparison above depends on the loaded state_dict.
    torch.manual_seed(2)
    assert not torch.allclose(nestc_runtime.load(plan_dir)(tokens).detach(), expected, rtol=1e-3, atol=1e-4)


def test_loaded_plan_matches_the_compiler(tmp_path: Path) -> None:
    """What `load` builds from plan.json is the model the compiler builds in process (`nestc.compile`)."""
    plan_dir = write_plan("gated_deltanet", tmp_path)
    torch.manual_seed(3)
    direct = nestc.compile(SPECS_DIR / "gated_deltanet.nest", **SIZES)
    torch.manual_seed(3)
    loaded = nestc_runtime.load(plan_dir)
    assert loaded.plan == direct.plan
    tokens = torch.randint(0, 257, (2, 13))
    assert torch.equal(loaded(tokens), direct(tokens))


def _rename_level(plan: dict[str, Any], new: str) -> None:
    plan["levels"] = {new if k == "memory" else k: {**v, "name": new} for k, v in plan["levels"].items()}

    def fix(layers: list[dict[str, Any]]) -> None:
        for layer in layers:
            if layer.get("level") == "memory":
                layer["level"] = new
            fix(layer.get("body", []))

    fix(plan["layers"])


def _set_key_fn(plan: dict[str, Any], fn: str) -> None:
    plan["levels"]["memory"]["exprs"]["keys"]["fn"] = fn


def _set_linear_id(plan: dict[str, Any], ident: str) -> None:
    plan["levels"]["memory"]["exprs"]["values"]["id"] = ident


def _set_layer_op(plan: dict[str, Any], op: str) -> None:
    plan["layers"][-1]["op"] = op


def _set_instance(plan: dict[str, Any], name: str) -> None:
    plan["layers"][1]["body"][1]["name"] = name


TAMPERINGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "level name": lambda p: _rename_level(p, "x; import os"),
    "unknown fn eval": lambda p: _set_key_fn(p, "eval"),
    "linear id": lambda p: _set_linear_id(p, "__import__('os')"),
    "layer op": lambda p: _set_layer_op(p, "exec"),
    "instance name": lambda p: _set_instance(p, "memory[0]; rm"),
    "objective": lambda p: p["levels"]["memory"].update(objective="eval"),
    "chunk": lambda p: p["levels"]["memory"].update(chunk=0),
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_tampered_plan_is_rejected(tamper: Callable[[dict[str, Any]], None], tmp_path: Path) -> None:
    plan_dir = write_plan("deltanet", tmp_path)
    path = plan_dir / "plan.json"
    raw = json.loads(path.read_text())
    nestc_runtime.load(plan_dir)  # the untouched plan loads
    # Renaming to a valid identifier still loads: the rejection is about the name, not about renaming.
    ok = json.loads(path.read_text())
    _rename_level(ok, "renamed_level")
    path.write_text(json.dumps(ok))
    assert "renamed_level" in nestc_runtime.load(plan_dir).plan.levels

    tamper(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(RuntimeInputError) as info:
        nestc_runtime.load(plan_dir)
    assert "plan.json" in str(info.value)


def test_missing_and_malformed_plans_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(RuntimeInputError):
        nestc_runtime.load(tmp_path)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(RuntimeInputError):
        nestc_runtime.load(tmp_path)

"""The command line: exit codes 0 / 1 / 2 / 70, one-line errors with file:line:col, a caret and a hint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nestc import cli
from nestc.cli import main

ROOT = Path(__file__).parents[1]
SPEC = ROOT / "specs" / "deltanet.nest"
BAD = ROOT / "tests" / "bad_specs" / "e021_nested_slower.nest"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", str(SPEC))
    assert code == 0 and "ok" in out


def test_check_bad_spec_prints_position_caret_and_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", str(BAD))
    assert code == 1
    first = err.splitlines()[0]
    assert first.startswith(f"{BAD}:14:5: error[E021]:")
    assert "^^^" in err and "= hint:" in err and "Traceback" not in err


def test_check_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", str(BAD), "--format", "json")
    assert code == 1
    items = json.loads(out)
    assert {"code": "E021", "line": 14, "col": 5}.items() <= items[0].items()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "check", str(tmp_path / "missing.nest"))[0] == 2
    assert run(capsys, "check", str(SPEC), "--bogus")[0] == 2
    assert run(capsys, "check", str(SPEC), "--set", "d")[0] == 2
    assert run(capsys, "check", str(SPEC), "--set", "d=a+b")[0] == 2
    assert run(capsys, "check", str(SPEC), "--set", "d=[1,x]")[0] == 2
    assert run(capsys, "explain", "E999")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2


def test_unknown_spec_parameter_is_an_input_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", str(SPEC), "--set", "dd=3")
    assert code == 1 and "E017" in err and "did you mean `d`?" in err
    code, _, err = run(capsys, "check", str(SPEC), "--set", "d=abc")
    assert code == 1 and "E016" in err and "`d` is a number, not a name" in err


def test_explain(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "e020")
    assert code == 0 and "evaluation-order cycle" in out


def test_internal_error_is_exit_70_without_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("deliberate")

    monkeypatch.setattr(cli, "front_end", boom)
    monkeypatch.delenv("NESTC_DEBUG", raising=False)
    code, _, err = run(capsys, "check", str(SPEC))
    assert code == 70
    assert "internal error" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_compile_writes_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, _ = run(capsys, "compile", str(SPEC), "-o", str(tmp_path / "build"), "--set", "d=32")
    assert code == 0
    for name in ("plan.json", "ir.json", "schedule.txt", "spec.nest"):
        assert (tmp_path / "build" / name).is_file()
    assert json.loads((tmp_path / "build" / "plan.json").read_text())["d"] == 32


def test_train_bad_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = run(capsys, "train", str(SPEC), "--data", str(tmp_path / "none.txt"), "--steps", "1", "--out", "o")
    assert missing[0] == 2
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    code, _, err = run(capsys, "train", str(SPEC), "--data", str(tiny), "--steps", "1", "--out", str(tmp_path / "o"))
    assert code == 1 and "error:" in err and "Traceback" not in err
    bad_setting = run(capsys, "train", str(SPEC), "--data", str(tiny), "--steps", "1", "--out", "o", "--set", "x.y=1")
    assert bad_setting[0] == 2


def test_console_script_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nestc", "check", str(BAD)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "error[E021]" in result.stderr and "Traceback" not in result.stderr


def test_every_printing_command_speaks_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "compile", str(SPEC), "-o", str(tmp_path / "b"), "--format", "json")
    assert code == 0 and json.loads(out)["files"][0] == "plan.json"
    code, out, _ = run(capsys, "explain", "E021", "--format", "json")
    assert code == 0 and json.loads(out)["title"] == "nested level slower than its owner"
    code, out, _ = run(capsys, "viz", str(SPEC), "-o", str(tmp_path / "p.dot"), "--format", "json")
    assert code == 0 and json.loads(out)["format"] == "dot"
    for command in (["check", str(SPEC)], ["show", str(SPEC)], ["fmt", "--check", str(SPEC)]):
        code, out, _ = run(capsys, *command, "--format", "json")
        assert code == 0
        json.loads(out)


@pytest.mark.parametrize("command", ["check", "show", "compile"])
def test_run_settings_outside_train_are_a_usage_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--set optim.lr=...` means something to `train` only; elsewhere it was silently ignored."""
    extra = ["-o", str(tmp_path / "out")] if command == "compile" else []
    assert main([command, str(SPEC), "--set", "optim.lr=0.1", *extra]) == 2
    assert "apply to `nestc train` only" in capsys.readouterr().err

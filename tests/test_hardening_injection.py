"""No code injection: hostile names and strings go through every command, and nothing they say is executed.

Every payload below would create a sentinel file if anything evaluated it (Python `eval`/`exec`, a shell, a
format string reaching an attribute); the sentinel must never appear. Bad input must give a clean exit (1 for
the input, 2 for usage), never a traceback or exit 70. Files written by `nestc compile -o` that are Python source
(there are none today; generated kernels may add some) must parse and must not contain any spec text other than
validated identifiers. Finally an audit of the code: nothing in nestc/ or runtime/ calls eval/exec, unpickles,
or loads with torch.load without weights_only.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestc.cli import main
from nestc_runtime.plan import IDENTIFIER

ROOT = Path(__file__).parents[1]


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "a payload was executed"


def payloads(sentinel: Path) -> list[str]:
    """Ways a string could be executed: Python, shell command substitution, backticks, format strings."""
    return [
        f"__import__('os').system('touch {sentinel}')",
        f"$(touch {sentinel})",
        f"`touch {sentinel}`",
        f"'; import os; os.system('touch {sentinel}'); '",
        "{0.__class__.__mro__[1].__subclasses__()}",
        "%s%s%s%n",
    ]


# A valid spec whose names are Python's dangerous builtins: they are identifiers, so they are accepted, and they
# must stay inert names (dictionary keys, module names) everywhere they go.
EVIL_NAMES = """\
# COMMENT
system __import__(d = 64, heads = 2, layers = 1, vocab = 257, __class__ = 2) {
  level exec { update every step; optimizer adamw(lr = 1e-3) }
  level eval in exec {
    memory    matrix per head
    queries   linear(x) |> l2norm
    keys      linear(x) |> l2norm
    values    linear(x)
    objective l2(eval(keys), values)
    optimizer gd(lr = sigmoid(linear(x)) per head, retain = 1)
    update every token; read online
  }
  lambda = residual(rmsnorm -> eval -> linear)
  model = embed -> lambda * layers -> rmsnorm -> head
}
"""


def _evil_spec(tmp_path: Path, sentinel: Path) -> Path:
    path = tmp_path / "evil.nest"
    path.write_text(EVIL_NAMES.replace("COMMENT", " ; ".join(payloads(sentinel))))
    return path


def _hostile_specs(sentinel: Path) -> dict[str, str]:
    """Invalid specs carrying payloads where a spec has strings, names, numbers and keyword arguments."""
    base = (ROOT / "specs" / "deltanet.nest").read_text()
    cases: dict[str, str] = {}
    for i, payload in enumerate(payloads(sentinel)):
        quoted = payload.replace('"', "'")
        cases[f"import-{i}"] = f'import "{quoted}"\n' + base
        cases[f"import-nest-{i}"] = f'import "{quoted}.nest"\n' + base
        cases[f"name-{i}"] = base.replace("system deltanet", f"system {payload}")
        cases[f"rate-{i}"] = base.replace("retain = 1", f"retain = {payload}")
        cases[f"kwarg-{i}"] = base.replace("weight_decay = 0.1", f"weight_decay = 0.1, {payload} = 1")
    cases["traversal"] = 'import "../../../../../../../../etc/passwd"\n' + base
    cases["traversal-nest"] = 'import "../../../../../../../../etc/passwd.nest"\n' + base
    cases["absolute"] = 'import "/etc/passwd"\n' + base
    cases["newline-in-string"] = 'import "a\nb.nest"\n' + base
    cases["cyrillic-lookalike"] = base.replace("level memory", "level m\u0435mory")
    cases["fullwidth-lookalike"] = base.replace("system deltanet", "system \uff44eltanet")
    cases["right-to-left-override"] = base.replace("system deltanet", "system delta\u202enet")
    cases["zero-width-joiner"] = base.replace("level memory", "level mem\u200dory")
    cases["line-separator"] = base.replace("\n", "\u2028", 3)
    cases["form-feed-and-cr"] = base.replace("\n", "\r", 4).replace("system", "\x0csystem")
    cases["long-name"] = base.replace("system deltanet", "system " + "a" * 100_000)
    cases["long-number"] = base.replace("d = 64", "d = " + "9" * 10_000)
    cases["deep-nesting"] = base.replace("retain = 1", "retain = " + "(" * 5_000 + "1" + ")" * 5_000)
    return cases


# Odd but harmless: other line breaks inside comments, and deeply nested parentheses, are valid specs.
STILL_VALID = {"line-separator", "form-feed-and-cr", "deep-nesting"}


def _clean_failure(code: int, err: str) -> None:
    assert code in (1, 2), f"exit {code}: {err}"
    assert "Traceback" not in err and "internal error" not in err, err


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in err, err
    return code, out, err


# ---- hostile specs through the front-end commands ----------------------------------------------------------------


def test_hostile_specs_are_refused_cleanly_by_every_front_end_command(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, text in _hostile_specs(sentinel).items():
        spec = tmp_path / f"{name}.nest"
        spec.write_text(text, encoding="utf-8")
        commands = [
            ["check", str(spec), "--format", "json"],
            ["fmt", "--stdout", str(spec)],
            ["compile", str(spec), "-o", str(tmp_path / f"{name}-out")],
        ]
        if name.endswith("-0") or name.startswith("traversal"):  # the same front end: a sample is enough
            commands += [["check", str(spec)], ["show", str(spec)], ["viz", str(spec), "-o", str(tmp_path / "x.svg")]]
        for args in commands:
            code, _, err = _run(args, capsys)
            assert code in (0, 1, 2), f"{name}: exit {code}"
            if args[0] != "fmt" and name not in STILL_VALID:  # fmt only parses: it leaves imports alone
                _clean_failure(code, err)
            assert "root:" not in err, f"{name}: a line of /etc/passwd was quoted"


def test_evil_names_stay_names_through_every_command(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = str(_evil_spec(tmp_path, sentinel))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world. " * 200)
    out = tmp_path / "compiled"
    run = tmp_path / "run"
    prompt = payloads(sentinel)[0]
    commands = [
        ["check", spec],
        ["fmt", "--stdout", spec],
        ["fmt", spec],  # rewrites it in canonical form; the commands below use that
        ["show", spec, "--format", "json"],
        ["compile", spec, "-o", str(out)],
        ["viz", spec, "-o", str(tmp_path / "evil.svg")],
        ["viz", spec, "-o", str(tmp_path / "evil.html")],
        ["train", spec, "--data", str(corpus), "--steps", "2", "--batch", "2", "--seq-len", "16", "--out", str(run)],
        ["eval", spec, "--ckpt", str(run), "--task", "memorize"],
        ["generate", spec, "--ckpt", str(run), "--prompt", prompt, "--max-tokens", "4"],
    ]
    for args in commands:
        code, _, err = _run([*args, "--no-progress"] if args[0] == "train" else args, capsys)
        assert code == 0, f"nestc {args[0]}: exit {code}\n{err}"
    assert_python_files_carry_only_identifiers(out, EVIL_NAMES)
    if (out / "kernels").is_dir():  # generated kernels (d_k = 32 is large enough for them) exist: they were checked
        assert list((out / "kernels").glob("*.py"))


def assert_python_files_carry_only_identifiers(directory: Path, spec_text: str) -> int:
    """Every .py file under `directory` parses, and the only spec text in it is names that match IDENTIFIER:
    no comment, string or number-with-text from the spec appears in a string literal or as code."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", spec_text))
    comment = spec_text.splitlines()[0].lstrip("# ")
    checked = 0
    for path in directory.rglob("*.py"):
        checked += 1
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))  # generated source must be valid Python
        assert comment[:20] not in source, f"{path} quotes the spec's comment"
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for word in re.findall(r"\S+", node.value):
                    if word in words:
                        assert IDENTIFIER.match(word), f"{path}: {word!r}"
            if isinstance(node, (ast.Call)) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "compile", "__import__"), f"{path} calls {node.func.id}"
    return checked


def test_the_python_file_check_catches_pasted_spec_text(tmp_path: Path) -> None:
    """The check above is not vacuous: a generated file that pastes the spec's comment, or calls eval, fails."""
    (tmp_path / "kernel.py").write_text(f"DOC = {EVIL_NAMES.splitlines()[0]!r}\n")
    with pytest.raises(AssertionError, match="quotes"):
        assert_python_files_carry_only_identifiers(tmp_path, EVIL_NAMES)
    (tmp_path / "kernel.py").write_text("x = eval('1')\n")
    with pytest.raises(AssertionError, match="calls eval"):
        assert_python_files_carry_only_identifiers(tmp_path, EVIL_NAMES)


def test_compile_output_of_every_shipped_spec_has_no_pasted_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever `compile -o` writes now or later (generated kernels), its Python parses and pastes no spec text."""
    checked = 0
    for spec in sorted((ROOT / "specs").glob("*.nest")):
        out = tmp_path / spec.stem
        code, _, err = _run(["compile", str(spec), "-o", str(out), "--set", "d=64"], capsys)  # d_k >= 16
        assert code == 0, err
        checked += assert_python_files_carry_only_identifiers(out, spec.read_text())
    if (ROOT / "nestc" / "codegen").is_dir():  # generated kernels exist: some spec's output had Python to check
        assert checked > 0


# ---- hostile flags and files ---------------------------------------------------------------------------------


def test_hostile_flag_values_are_usage_errors(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = str(ROOT / "specs" / "deltanet.nest")
    for payload in payloads(sentinel):
        for args in (
            ["check", spec, "--set", f"d={payload}"],
            [
                "train",
                spec,
                "--data",
                spec,
                "--steps",
                "1",
                "--out",
                str(tmp_path / "r"),
                "--set",
                f"optim.lr={payload}",
            ],
            ["explain", payload],
        ):
            code, _, err = _run(args, capsys)
            _clean_failure(code, err)
        # as a parameter name: unknown (E017), or, with a dot, a run setting `check` has no use for
        code, _, err = _run(["check", spec, "--set", f"{payload}=1"], capsys)
        assert code in (0, 1, 2), err


def test_non_finite_settings_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """inf passed pydantic's `gt=0` and then broke the JSON of the checkpoint (exit 70)."""
    spec = str(ROOT / "specs" / "deltanet.nest")
    for value in ("inf", "-inf", "nan", "1e999"):
        for setting in ("optim.lr", "train.max_read", "optim.grad_clip"):
            args = ["train", spec, "--data", spec, "--steps", "1", "--out", str(tmp_path / "r"), "--set"]
            code, _, err = _run([*args, f"{setting}={value}"], capsys)
            assert code == 2 and ("finite" in err or "greater than" in err), err


def test_hostile_checkpoint_and_state_paths(tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(ROOT / "specs" / "deltanet.nest")
    for ckpt in ("../../../../../../etc", "/etc/passwd", payloads(sentinel)[1], str(tmp_path)):
        code, _, err = _run(["eval", spec, "--ckpt", ckpt, "--task", "memorize"], capsys)
        _clean_failure(code, err)
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc " * 100)
    run = tmp_path / "run"
    train = ["train", spec, "--set", "d=16", "--data", str(corpus), "--steps", "1", "--batch", "1", "--seq-len", "8"]
    assert _run([*train, "--out", str(run), "--no-progress"], capsys)[0] == 0
    for state in ("/etc/passwd", str(corpus)):
        args = ["generate", spec, "--set", "d=16", "--ckpt", str(run), "--prompt", "a", "--state", state]
        code, _, err = _run(args, capsys)
        assert code == 1, err


# ---- audit of the code -----------------------------------------------------------------------------------------

FORBIDDEN = re.compile(r"\b(eval|exec)\s*\(|\bpickle\b|\bmarshal\b|\bshelve\b|\bdill\b|os\.system|__import__\s*\(")
TORCH_LOAD = re.compile(r"torch\.load\s*\(([^)]*)\)")


def _sources() -> list[Path]:
    return [p for folder in ("nestc", "runtime") for p in sorted((ROOT / folder).rglob("*.py"))]


def test_no_eval_exec_or_pickle_in_the_code() -> None:
    found = []
    for path in _sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FORBIDDEN.search(code) and "model.eval(" not in code and ".eval()" not in code:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_torch_load_only_with_weights_only() -> None:
    for path in _sources():
        for match in TORCH_LOAD.finditer(path.read_text()):
            assert "weights_only=True" in match.group(1), f"{path}: torch.load without weights_only=True"


def test_the_audit_patterns_match_what_they_forbid() -> None:
    assert FORBIDDEN.search("x = eval(text)") and FORBIDDEN.search("import pickle")
    assert FORBIDDEN.search("exec (code)") and not FORBIDDEN.search("model.evaluate(x)")
    assert TORCH_LOAD.search("torch.load(path)") and "weights_only=True" not in TORCH_LOAD.search("torch.load(p)")[1]

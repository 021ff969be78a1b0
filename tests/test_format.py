"""The formatter: parse ∘ format is the identity on the AST, format is idempotent, comments survive, the shipped
specs are canonical, and `nestc fmt` checks, rewrites and prints as it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from test_fuzz_specs import GENERATED, planted

from nestc.cli import main
from nestc.diagnostics import CompileError, Source
from nestc.language import ast
from nestc.language.format import format_source
from nestc.language.parser import parse

ROOT = Path(__file__).parents[1]
SPEC_FILES = sorted((ROOT / "specs").rglob("*.nest"))  # specs and the fragments they import
CORPUS = sorted((ROOT / "tests" / "bad_specs").rglob("*.nest"))
COMMENT = re.compile(r'"[^"\n]*"|#[^\n]*')


def _parse(text: str, name: str = "spec.nest") -> ast.System | None:
    try:
        return parse(Source(name, text))
    except CompileError:
        return None


def _format(text: str, name: str = "spec.nest") -> str:
    source = Source(name, text)
    return format_source(source, parse(source))


def comments(text: str) -> list[str]:
    """Every `# ...` comment outside a string, in order, without trailing spaces."""
    return [m.group().rstrip() for m in COMMENT.finditer(text) if m.group().startswith("#")]


PARSING = [p for p in SPEC_FILES + CORPUS if _parse(p.read_text(), str(p)) is not None]


def _id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_there_is_something_to_format() -> None:
    assert SPEC_FILES and len(PARSING) > len(SPEC_FILES), "the specs and some corpus files parse"


@pytest.mark.parametrize("path", PARSING, ids=_id)
def test_format_keeps_the_ast(path: Path) -> None:
    text = path.read_text()
    assert _parse(_format(text)) == _parse(text)


@pytest.mark.parametrize("path", PARSING, ids=_id)
def test_format_is_idempotent(path: Path) -> None:
    once = _format(path.read_text())
    assert _format(once) == once


@pytest.mark.parametrize("path", PARSING, ids=_id)
def test_format_keeps_every_comment_in_order(path: Path) -> None:
    text = path.read_text()
    assert comments(_format(text)) == comments(text)


@pytest.mark.parametrize("path", SPEC_FILES, ids=_id)
def test_shipped_specs_are_canonical(path: Path) -> None:
    assert _format(path.read_text()) == path.read_text()


def test_fmt_check_passes_on_the_shipped_specs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fmt", "--check", *map(str, SPEC_FILES)]) == 0
    out, err = capsys.readouterr()
    assert "not canonical" not in out + err


# ---- the command ----------------------------------------------------------------------------------------------

CANONICAL = (ROOT / "specs" / "deltanet.nest").read_text()


def _mangle(text: str) -> str:
    """The same spec with ugly spacing (comments untouched): tabs, no spaces around `=` and `->`, blank lines,
    trailing spaces."""
    lines = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            line = line.replace("  ", "\t").replace(" = ", "=").replace(" -> ", "->").replace("; ", " ;  ") + "   "
        lines.append(line + "\n")
    return "\n".join(lines)


@pytest.fixture
def ugly(tmp_path: Path) -> Path:
    path = tmp_path / "ugly.nest"
    path.write_text(_mangle(CANONICAL))
    assert path.read_text() != CANONICAL
    return path


def test_fmt_check_on_a_non_canonical_file_exits_1_and_changes_nothing(
    ugly: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = ugly.read_text()
    assert main(["fmt", "--check", str(ugly)]) == 1
    _, err = capsys.readouterr()
    assert f"{ugly}: not canonical" in err
    assert ugly.read_text() == before
    assert main(["fmt", "--check", "--format", "json", str(ugly)]) == 1
    assert f'"not_canonical": ["{ugly}"]' in capsys.readouterr().out


def test_fmt_rewrites_to_the_canonical_text(ugly: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fmt", str(ugly)]) == 0
    assert f"{ugly}: formatted" in capsys.readouterr().err
    assert ugly.read_text() == CANONICAL
    assert not list(ugly.parent.glob("*.tmp")), "the atomic write leaves no temporary file"
    assert main(["fmt", "--check", str(ugly)]) == 0


def test_fmt_stdout_prints_and_leaves_the_file(ugly: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = ugly.read_text()
    assert main(["fmt", "--stdout", str(ugly)]) == 0
    assert capsys.readouterr().out == CANONICAL
    assert ugly.read_text() == before


def test_fmt_on_a_syntax_error_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.nest"
    bad.write_text("system s(d = 1) {\n  model = embed -> -> head\n}\n")
    assert main(["fmt", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:20: error[E001]" in err and "Traceback" not in err
    assert bad.read_text() == "system s(d = 1) {\n  model = embed -> -> head\n}\n"


def test_fmt_keeps_comments_where_they_were(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "c.nest"
    spec.write_text(
        "# head comment\nsystem s(d=16,vocab=257){ # after the brace\n"
        "  # before the level\n  level train{update every step;optimizer adamw(lr=1e-3)} # trailing\n"
        "  model=embed->head\n  # before the end\n}\n# after the end\n"
    )
    assert main(["fmt", "--stdout", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out == (
        "# head comment\nsystem s(d = 16, vocab = 257) {  # after the brace\n"
        "  # before the level\n  level train { update every step; optimizer adamw(lr = 1e-3) }  # trailing\n\n"
        "  model = embed -> head\n  # before the end\n}\n# after the end\n"
    )


# ---- the same properties on texts generated from the grammar ------------------------------------------------

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@PROPERTY
@given(text=GENERATED | planted())
def test_format_of_generated_texts(text: str) -> None:
    tree = _parse(text)
    assert tree is not None, text
    formatted = _format(text)
    assert _parse(formatted) == tree, f"{text}\n---\n{formatted}"
    assert _format(formatted) == formatted
    # Every comment survives; a comment inside a multi-line construct (`import # c\n "f.nest"`) may move after it.
    assert sorted(comments(formatted)) == sorted(comments(text))

"""`nestc explain`, `nestc show`, and the diagnostics only the CLI can produce (E017 from `--set`, E040 from
`nestc compile`)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestc import codes
from nestc.cli import main
from nestc.ir import models as ir
from nestc.pipeline import front_end

ROOT = Path(__file__).parents[1]
SPECS = sorted((ROOT / "specs").glob("*.nest"))
CORPUS = sorted((ROOT / "tests" / "bad_specs").glob("*.nest"))
EXPECT = re.compile(r"#\s*expect:\s*(E\d{3})\s*@\s*(\d+):(\d+)")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---- explain -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(codes.EXPLANATIONS))
def test_explain_prints_the_title(code: str, capsys: pytest.CaptureFixture[str]) -> None:
    title, text = codes.EXPLANATIONS[code]
    status, out, err = run(capsys, "explain", code)
    assert status == 0, err
    assert out.startswith(f"{code}: {title}\n")
    assert text.split()[0] in out
    assert run(capsys, "explain", code.lower())[:2] == (0, out)


def test_explain_an_unknown_code_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "explain", "E0999")
    assert status == 2 and "no diagnostic code" in err and "Traceback" not in err


def test_codes_are_stable_and_well_formed() -> None:
    assert all(re.fullmatch(r"[EW]\d{3}", c) for c in codes.EXPLANATIONS)
    assert all(title and text for title, text in codes.EXPLANATIONS.values())


# ---- every error code has a test ----------------------------------------------------------------------------

# Codes a spec file cannot produce through `front_end` alone, each tested below through the CLI.
CLI_ONLY = {"E017": "`--set NAME=V` naming no parameter", "E040": "raised by `nestc compile`, not `check`"}


def test_every_error_code_has_a_corpus_file_or_a_cli_test() -> None:
    covered = {EXPECT.search(p.read_text().splitlines()[0]).group(1) for p in CORPUS}  # type: ignore[union-attr]
    errors = {c for c in codes.EXPLANATIONS if c.startswith("E")}
    assert errors - covered == set(CLI_ONLY), f"no corpus file for {sorted(errors - covered - set(CLI_ONLY))}"


def test_at_least_half_of_the_corpus_is_semantic() -> None:
    """Rule errors (E020-E030), not typos, make up at least half of the corpus."""
    found = [EXPECT.search(p.read_text().splitlines()[0]).group(1) for p in CORPUS]  # type: ignore[union-attr]
    semantic = [c for c in found if 20 <= int(c[1:]) <= 30]
    assert 2 * len(semantic) >= len(found), f"{len(semantic)} semantic of {len(found)}"


def test_set_of_an_unknown_parameter_is_e017(capsys: pytest.CaptureFixture[str]) -> None:
    spec = ROOT / "specs" / "deltanet.nest"
    status, out, _ = run(capsys, "check", str(spec), "--set", "layer=3", "--format", "json")
    assert status == 1
    (item,) = json.loads(out)
    assert item["code"] == "E017" and "did you mean `layers`?" in item["hint"]
    assert (item["line"], item["col"]) == (5, 8)  # the system's name


UNSUPPORTED = """\
system s(d = 16, heads = 2, vocab = 257) {
  level train { update every step; optimizer adamw(lr = 1e-3) }
  level m in train {
    memory    mlp(depth = 3, expand = 4) per head
    queries   linear(x)
    keys      linear(x) |> l2norm
    values    linear(x)
    objective l2(m(keys), values)
    optimizer gd(lr = 0.1)
    update every 16 tokens; read online
  }
  model = embed -> m -> head
}
"""


def test_compile_refuses_what_the_runtime_cannot_run_with_e040(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An MLP memory that is not the residual 2-layer form: valid (`check` exits 0), not runnable yet."""
    spec = tmp_path / "mlp3.nest"
    spec.write_text(UNSUPPORTED)
    assert run(capsys, "check", str(spec))[0] == 0
    status, _, err = run(capsys, "compile", str(spec), "-o", str(tmp_path / "build"))
    assert status == 1, err
    assert f"{spec}:4:5: error[E040]:" in err and "not supported by the runtime yet" in err
    assert "Traceback" not in err
    assert not (tmp_path / "build" / "plan.json").exists()


# ---- show ------------------------------------------------------------------------------------------------------


def _level_uses(node: ir.Node, count: int = 1) -> Iterator[tuple[str, int]]:
    """(level, how many instances) for every level used as a layer; a repetition multiplies."""
    if isinstance(node, ir.LevelNode):
        if node.read is None:
            yield node.level, count
    elif isinstance(node, (ir.SeqNode, ir.ParallelNode)):
        for item in node.items:
            yield from _level_uses(item, count)
    elif isinstance(node, ir.RepeatNode):
        yield from _level_uses(node.body, count * node.count)
    elif isinstance(node, ir.ResidualNode):
        yield from _level_uses(node.body, count)
    elif isinstance(node, ir.GateNode):
        yield from _level_uses(node.value, count)
        yield from _level_uses(node.gate, count)
    elif isinstance(node, ir.PrefixNode):
        yield from _level_uses(node.attention, count)
        yield from _level_uses(node.memory, count)


def _has_projection(expr: ir.Expr) -> bool:
    if isinstance(expr, ir.Linear):
        return True
    if isinstance(expr, (ir.Fn, ir.Read)):
        return _has_projection(expr.arg)
    if isinstance(expr, ir.Bin):
        return _has_projection(expr.left) or _has_projection(expr.right)
    return False


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_show_json_lists_every_level_instance(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "show", str(spec), "--format", "json")
    assert status == 0, err
    rows = json.loads(out)
    names = [r["instance"] for r in rows]
    assert len(names) == len(set(names)), f"an instance is listed twice: {names}"
    by_name = {r["instance"]: r for r in rows}
    system = front_end(spec).system

    uses = Counter[str]()
    for level, count in _level_uses(system.model):
        uses[level] += count
    for level, count in uses.items():
        expected = [f"{level}[{i}]" for i in range(count)] if count > 1 else [level]
        assert set(expected) <= set(names), f"{level} used {count} times; rows: {names}"

    for level in system.levels:  # every declared level has at least one row
        mine = [r for n, r in by_name.items() if n == level.name or n.startswith(f"{level.name}[")]
        assert mine, f"no row for level `{level.name}`: {names}"
        exprs = [*level.roles.values(), *(r.expr for r in level.rates().values())]
        if any(_has_projection(e) for e in exprs):
            assert all(r["params"] > 0 for r in mine), f"`{level.name}` has projections: {mine}"
    assert all(isinstance(r["params"], int) and r["params"] >= 0 for r in rows)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_show_expands_block_times_layers(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In a `block * layers` spec, each level of the block is `name[0]` ... `name[layers - 1]`."""
    system = front_end(spec).system
    repeats = [n for n in _nodes(system.model) if isinstance(n, ir.RepeatNode)]
    if not repeats:
        pytest.skip("no repeated block")
    status, out, _ = run(capsys, "show", str(spec), "--format", "json")
    assert status == 0
    rows = json.loads(out)
    layers = int(system.params.get("layers", repeats[0].count))
    assert repeats[0].count == layers
    block_levels = {level for level, _ in _level_uses(repeats[0].body)}
    for level in block_levels:
        instances = [r for r in rows if r["instance"].startswith(f"{level}[") and r["group"] == repeats[0].name]
        assert [r["instance"] for r in instances] == [f"{level}[{i}]" for i in range(layers)]
        assert len({r["params"] for r in instances}) == 1, "every layer's instance has the same size"


def _nodes(node: ir.Node) -> Iterator[ir.Node]:
    yield node
    for child in ("items", "body", "value", "gate", "attention", "memory"):
        value = getattr(node, child, None)
        for item in value if isinstance(value, list) else [value] if value is not None else []:
            yield from _nodes(item)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_show_text_table(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "show", str(spec))
    assert status == 0, err
    system = front_end(spec).system
    assert out.startswith(f"system {system.name}: ") and "level instances" in out.splitlines()[0]


def test_show_of_a_bad_spec_is_an_input_error(capsys: pytest.CaptureFixture[str]) -> None:
    bad = ROOT / "tests" / "bad_specs" / "e021_nested_slower.nest"
    status, out, _ = run(capsys, "show", str(bad), "--format", "json")
    assert status == 1
    assert json.loads(out)[0]["code"] == "E021"

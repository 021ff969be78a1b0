"""Rules of DESIGN §3 on valid and invalid systems, the IR's JSON round trip, and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

import nestc
from nestc.ir.graph import evaluation_graph
from nestc.ir.models import System
from nestc.pipeline import SpecError, front_end

SPECS = sorted((Path(__file__).parents[1] / "specs").glob("*.nest"))
ROOT = Path(__file__).parent / "bad_specs"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_check_clean(path: Path) -> None:
    """No errors; a warning a shipped spec keeps is explained in a comment of the file it points into."""
    compilation = front_end(path)
    for warning in compilation.warnings:
        assert warning.span is not None
        source = compilation.sources.get(warning.span.file)
        assert source is not None
        explained = [
            line for line in source.text.splitlines() if line.lstrip().startswith("#") and warning.code in line
        ]
        assert explained, f"{warning.span.file} keeps {warning.code} without a comment saying why"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_ir_json_round_trip(path: Path) -> None:
    system = nestc.load(path)
    again = System.model_validate_json(system.model_dump_json())
    assert again == system


def test_cycle_error_names_every_site() -> None:
    with pytest.raises(SpecError) as info:
        front_end(ROOT / "e020_cycle_two_levels.nest")
    (diag,) = [d for d in info.value.diagnostics if d.code == "E020"]
    for site in ("update of `a`", "update of `b`", "`a` read online (b.values)", "`b` read online (a.keys)"):
        assert site in diag.message


def test_boundary_self_read_is_not_a_cycle(tmp_path: Path) -> None:
    text = (ROOT / "e020_cycle_online_self_keys.nest").read_text().replace("read = online", "read = boundary")
    spec = tmp_path / "ok.nest"
    spec.write_text(text)
    system = nestc.load(spec)  # checks clean: the level generates its keys from its boundary state
    graph = evaluation_graph(system)
    assert ("read", "m", "boundary", "m.keys") in graph
    assert not graph.has_edge(("update", "m"), ("read", "m", "boundary", "m.keys"))


def test_nesting_errors_name_both_levels_and_numbers() -> None:
    with pytest.raises(SpecError) as info:
        front_end(ROOT / "e022_chunk_not_dividing.nest")
    message = str(info.value)
    assert "`inner`" in message and "`outer`" in message and "24" in message and "64" in message
    with pytest.raises(SpecError) as info:
        front_end(ROOT / "e021_nested_slower.nest")
    message = str(info.value)
    assert "`slow`" in message and "`fast`" in message and "256" in message and "16" in message


def test_all_errors_of_a_file_are_reported_at_once(tmp_path: Path) -> None:
    spec = tmp_path / "many.nest"
    spec.write_text(
        "system s(d = 16, heads = 2, vocab = 257) {\n"
        "  level train { update every step; optimizer adamw(lr = 1e-3, lr = 2) }\n"
        "  level m in train { memory matrx; keys linear(x); values linear(x); queries foo(x)\n"
        "    objective l2(m(keys), values); optimizer gd(lr = 1); update every token }\n"
        "  model = embed -> m -> hed\n"
        "}\n"
    )
    with pytest.raises(SpecError) as info:
        front_end(spec)
    codes = sorted(d.code for d in info.value.diagnostics)
    assert codes == ["E010", "E010", "E011", "E015"], codes


def test_set_overrides_parameters_and_rejects_unknown_names() -> None:
    spec = Path(__file__).parents[1] / "specs" / "deltanet.nest"
    assert nestc.load(spec, d=32, heads=4).params["d"] == 32
    with pytest.raises(SpecError) as info:
        nestc.load(spec, dd=32)
    assert "E017" in str(info.value) and "did you mean `d`?" in str(info.value)


def test_stop_mode_warns_about_projections_without_gradient(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "specs" / "deltanet.nest").read_text()
    spec = tmp_path / "stop.nest"
    spec.write_text(text.replace("outer gradient through", "outer gradient stop"))
    warnings = front_end(spec).warnings
    assert [w.code for w in warnings] == ["W001"]
    assert "keys, values, lr" in warnings[0].message


def test_self_modifying_titans_checks_clean_and_its_online_variant_is_a_cycle(tmp_path: Path) -> None:
    specs = Path(__file__).parents[1] / "specs"
    assert {w.code for w in front_end(specs / "titans_selfmod.nest").warnings} <= {"W003"}
    fragment = (specs / "fragments" / "self_modifying_titans.nest").read_text()
    # M_k generating its own keys from its online state needs its update before the update happens.
    broken = fragment.replace("keys      conv(4, M_k(x))", "keys      conv(4, M_k(x, read = online))", 1)
    assert broken != fragment
    (tmp_path / "fragments").mkdir()
    (tmp_path / "fragments" / "self_modifying_titans.nest").write_text(broken)
    spec = tmp_path / "selfmod.nest"
    spec.write_text((specs / "titans_selfmod.nest").read_text())
    with pytest.raises(SpecError) as info:
        front_end(spec)
    (diag,) = [d for d in info.value.diagnostics if d.code == "E020"]
    assert "update of `M_k`" in diag.message and "`M_k` read online (M_k.keys)" in diag.message


def test_rates_that_may_leave_their_range_are_warned_about(tmp_path: Path) -> None:
    """η ≥ 0, α and β in [0, 1]: a learned projection is unbounded (W004), a squashed one is not; constants
    outside are errors (tests/bad_specs/e016_*)."""
    text = (Path(__file__).parents[1] / "specs" / "titans_lmm.nest").read_text()
    spec = tmp_path / "rates.nest"
    spec.write_text(text.replace('import "fragments/', f'import "{Path(__file__).parents[1]}/specs/fragments/'))
    assert not [w for w in front_end(spec).warnings if w.code == "W004"]
    fragment = (Path(__file__).parents[1] / "specs" / "fragments" / "titans_memory.nest").read_text()
    for old, new, name in [
        ("retain = 1 - sigmoid(linear(x) - 8)", "retain = 1 - linear(x)", "retain"),
        ("momentum = sigmoid(linear(x))", "momentum = 2 * sigmoid(linear(x))", "momentum"),
        ("lr = sigmoid(linear(x)) * eta_max", "lr = tanh(linear(x)) * eta_max", "lr"),
    ]:
        assert old in fragment
        (tmp_path / "memory.nest").write_text(fragment.replace(old, new))
        spec.write_text(text.replace('"fragments/titans_memory.nest"', '"memory.nest"'))
        warnings = [w for w in front_end(spec).warnings if w.code == "W004"]
        assert len(warnings) == 1 and f"`{name}` of `memory`" in warnings[0].message, warnings


def test_value_range_is_sound_on_examples() -> None:
    from nestc.checks.ranges import value_range
    from nestc.ir import models as ir

    x = ir.Linear(id="a", arg=ir.Input())
    const = ir.Const

    def fn(name: str, arg: ir.Expr) -> ir.Fn:
        return ir.Fn(fn=name, arg=arg)

    assert value_range(fn("sigmoid", ir.Bin(kind="+", left=fn("mean", x), right=const(value=4)))) == (0.0, 1.0)
    assert value_range(ir.Bin(kind="*", left=fn("sigmoid", x), right=const(value=0.1))) == (0.0, 0.1)
    assert value_range(ir.Bin(kind="/", left=const(value=1), right=fn("tanh", x))) == (float("-inf"), float("inf"))
    assert value_range(ir.Bin(kind="/", left=const(value=1), right=fn("softplus", const(value=0.0))))[0] > 1.44
    low, high = value_range(fn("silu", x))
    assert low < -0.278 and high == float("inf")
    assert value_range(fn("l2norm", x)) == (-1.0, 1.0) and value_range(fn("conv", x))[0] == float("-inf")

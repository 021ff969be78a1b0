"""`nestc viz`: every picture names every level instance and draws every edge of the IR.

Expected edges are computed here from the IR (levels, owners, reads, objectives), not from nestc.viz.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path

import pytest

from nestc.cli import main
from nestc.ir import models as ir
from nestc.ir.instances import Instance, instances
from nestc.pipeline import Compilation, front_end
from nestc.viz import mermaid_id, render

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.nest"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@cache
def compiled(path: str, chunks: str = "") -> Compilation:
    params = {"chunks": [float(c) for c in chunks.split(",")]} if chunks else None
    return front_end(path, params)


def _same_block(level: str, like: Instance, insts: list[Instance]) -> str:
    candidates = [i for i in insts if i.level == level]
    if len(candidates) == 1:
        return candidates[0].name
    same = [i for i in candidates if (i.group, i.index) == (like.group, like.index)]
    return (same or [i for i in candidates if i.index == like.index] or candidates)[0].name


def _has_projection(expr: ir.Expr) -> bool:
    if isinstance(expr, ir.Linear):
        return True
    if isinstance(expr, (ir.Fn, ir.Read)):
        return _has_projection(expr.arg)
    if isinstance(expr, ir.Bin):
        return _has_projection(expr.left) or _has_projection(expr.right)
    return False


def expected_edges(system: ir.System) -> set[tuple[str, str, str]]:
    """(src, dst, kind) of every edge the IR implies, by level instance."""
    insts = instances(system)
    roots = [lv.name for lv in system.levels if lv.outer is not None and lv.owner is None]
    edges = set()
    for inst in insts:
        level = system.level(inst.level)
        owner = level.owner or (roots[0] if level.memory is not None and len(roots) == 1 else None)
        if owner:
            edges.add((_same_block(owner, inst, insts), inst.name, "owns"))
        if level.objective is not None:
            edges.add((f"{inst.name}:objective", inst.name, "inner"))
        for role, expr in level.inputs().items():
            for read in ir.expr_reads(expr):
                edges.add((_same_block(read.level, inst, insts), inst.name, "generated"))
            if _has_projection(expr):
                edges.add((inst.name, f"{inst.name}:{role}", "outer"))
        if level.memory is not None and level.memory.kind == "mlp":
            edges.add((inst.name, f"{inst.name}:init", "outer"))
        if level.memory is not None and level.memory.persistent:
            edges.add((_same_block(level.memory.persistent, inst, insts), inst.name, "generated"))
    return edges


def dot_edges(text: str) -> set[tuple[str, str, str]]:
    found = set()
    for src, dst, kind in re.findall(r'"[hg]/([^"]+)" -> "[hg]/([^"]+)" \[class=(\w+)', text):
        found.add((src, dst, kind))
    return found


def svg_of(c: Compilation, view: str = "both") -> ET.Element:
    return ET.fromstring(render(c, "svg", view))


def level_boxes(root: ET.Element) -> list[str]:
    ns = "{http://www.w3.org/2000/svg}"
    return [g.get("data-instance", "") for g in root.iter(f"{ns}g") if g.get("class") == "level"]


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_svg_parses_and_names_every_instance(spec: Path) -> None:
    c = compiled(str(spec))
    root = svg_of(c)
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    names = [i.name for i in instances(c.system)]
    for name in names:
        assert name in texts or f"θ {name}" in texts, name
    hierarchy = svg_of(c, "hierarchy")
    assert sorted(level_boxes(hierarchy)) == sorted(names)  # one box per instance


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_png_decodes(spec: Path) -> None:
    from PIL import Image

    data = render(compiled(str(spec)), "png", "hierarchy")
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size[0] > 300 and image.size[1] > 100
    low, high = image.convert("L").getextrema()
    assert high - low > 100  # not one colour


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_dot_and_mermaid_have_every_level_and_edge(spec: Path) -> None:
    c = compiled(str(spec))
    dot = render(c, "dot").decode()
    mermaid = render(c, "mermaid").decode()
    for inst in instances(c.system):
        assert f'"h/{inst.name}"' in dot
        assert mermaid_id(f"h/{inst.name}") in mermaid and inst.name in mermaid
    expected = expected_edges(c.system)
    missing = expected - dot_edges(dot)
    assert not missing, f"edges missing from the DOT text: {sorted(missing)}"
    for src, dst, kind in expected:
        prefix = "h/" if kind == "owns" else "g/"
        pattern = rf"{mermaid_id(prefix + src)}(\(\[[^\]]*\]\))? [-.=]+> ?\|[^|]*\| {mermaid_id(prefix + dst)}\b"
        assert re.search(pattern, mermaid), (src, dst, kind)


def test_generated_edges_say_the_read_state() -> None:
    dot = render(compiled(str(ROOT / "specs/hope.nest")), "dot").decode()
    line = next(ln for ln in dot.splitlines() if '"g/M_k[0]" -> "g/M_memory[0]"' in ln)
    assert "keys · boundary" in line and 'mode="boundary"' in line


def test_one_more_cms_level_adds_one_box_per_layer() -> None:
    spec = str(ROOT / "specs/hope.nest")
    base, more = compiled(spec), compiled(spec, "16,64,256,1024")
    layers = int(base.system.number("layers"))
    old, new = level_boxes(svg_of(base, "hierarchy")), level_boxes(svg_of(more, "hierarchy"))
    assert len(new) == len(old) + layers
    assert sorted(set(new) - set(old)) == [f"cms[3][{i}]" for i in range(layers)]
    added = dot_edges(render(more, "dot").decode()) - dot_edges(render(base, "dot").decode())
    for i in range(layers):
        name = f"cms[3][{i}]"
        assert ("pretrain", name, "owns") in added
        assert (f"{name}:objective", name, "inner") in added
        assert (name, f"{name}:init", "outer") in added
    assert all(name.startswith("cms[3]") for edge in added for name in edge[:2] if "cms" in name)


def _variant(tmp_path: Path, mode: str) -> Compilation:
    text = (ROOT / "specs/deltanet.nest").read_text().replace("outer gradient through", f"outer gradient {mode}")
    path = tmp_path / f"deltanet_{mode.replace(' ', '')}.nest"
    path.write_text(text)
    return front_end(path)


def test_stop_changes_outer_gradient_edges_and_marks_w001(tmp_path: Path) -> None:
    through, stop = _variant(tmp_path, "through"), _variant(tmp_path, "stop")
    truncate = _variant(tmp_path, "truncate 2")

    def outer(c: Compilation) -> dict[tuple[str, str], str]:
        dot = render(c, "dot").decode()
        found = re.findall(r'"g/([^"]+)" -> "g/([^"]+)" \[class=outer, mode="([^"]+)"', dot)
        return {(s, d): m for s, d, m in found}

    a, b, t = outer(through), outer(stop), outer(truncate)
    assert a.keys() == b.keys() == t.keys()
    keys = ("memory[0]", "memory[0]:keys")
    assert (a[keys], b[keys], t[keys]) == ("through", "stop", "truncate 2")
    assert a[("memory[0]", "memory[0]:queries")] == b[("memory[0]", "memory[0]:queries")] == "read"
    # the W001 warning of `nestc check` and the marked parameters agree
    warned = [d for d in stop.warnings if d.code == "W001"]
    assert warned and not [d for d in through.warnings if d.code == "W001"]
    dot = render(stop, "dot").decode()
    marked = set(re.findall(r'^\s*"g/([^"]+)" \[.*no_gradient=true', dot, re.M))
    assert marked == {f"memory[{i}]:{r}" for i in range(2) for r in ("keys", "values", "lr")}
    assert "no_gradient" not in render(through, "dot").decode()
    svg = render(stop, "svg").decode()
    assert "W001" in svg and svg != render(through, "svg").decode()


def test_html_groups_and_expands_repeated_blocks() -> None:
    html = render(compiled(str(ROOT / "specs/hope.nest")), "html").decode()
    group = re.search(r'<details class="group" data-group="block" open>(.*?)</details>\s*</details>', html, re.S)
    assert group, "the repeated block is grouped"
    blocks = re.findall(r'<details class="block" data-group="block" data-index="(\d)"( open)?>', html)
    assert [b[0] for b in blocks] == ["0", "1"] and blocks[0][1] == " open"
    assert "setAll(true)" in html  # expand all
    for inst in instances(compiled(str(ROOT / "specs/hope.nest")).system):
        assert f'data-instance="{inst.name}"' in group.group(0) or inst.group is None


def test_cli_viz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(ROOT / "specs/deltanet.nest")
    for ext in ("svg", "png", "dot", "mmd", "html"):
        out = tmp_path / f"d.{ext}"
        assert main(["viz", spec, "-o", str(out), "--view", "gradients", "--set", "layers=3"]) == 0
        assert out.stat().st_size > 100
    assert "memory[2]" in (tmp_path / "d.dot").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"d.{e}" for e in ("svg", "png", "dot", "mmd", "html"))
    assert main(["viz", spec, "-o", str(tmp_path / "d.jpg")]) == 2
    assert main(["viz", spec, "-o", str(tmp_path / "d.svg"), "--view", "sideways"]) == 2
    bad = tmp_path / "bad.nest"
    bad.write_text((ROOT / "tests/bad_specs/e012_duplicate_level.nest").read_text())
    assert main(["viz", str(bad), "-o", str(tmp_path / "bad.svg")]) == 1
    assert not (tmp_path / "bad.svg").exists()
    capsys.readouterr()


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
def test_html_report_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image

    c = compiled(str(ROOT / "specs/hope.nest"))
    page = tmp_path / "hope.html"
    page.write_bytes(render(c, "html"))
    assert CHROMIUM is not None
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "<svg" in dom and 'class="level"' in dom
    for inst in instances(c.system):
        assert inst.name in dom, inst.name
    hrefs = set(re.findall(r'href="#([^"]+)"', dom))
    ids = set(re.findall(r'id="([^"]+)"', dom))
    assert any(re.fullmatch(r"L\d+", h) for h in hrefs)
    assert hrefs <= ids, f"links without anchors: {sorted(hrefs - ids)[:5]}"
    linked = re.findall(r'<a href="#[^"]*L\d+">\s*<g class="level" data-instance="([^"]+)"', dom)
    assert set(linked) == {i.name for i in instances(c.system)}  # every drawn level links to its source
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True,
        timeout=60,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 20  # content, not a single colour

"""Generated kernel source: snapshots, one source per key, validated keys only, the line map, the Triton API
it uses (nothing newer than Triton 3.6), `nestc compile -o` writing it, and ahead-of-time compilation for
sm_90 without a GPU. Update the snapshots with NESTC_UPDATE_SNAPSHOTS=1 (review the diff)."""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nestc.cli import cli
from nestc.codegen import render, render_matrix, source_for
from nestc.codegen.render import sections_of
from nestc_runtime.kernels.key import MatrixKernelKey, MLPKernelKey

SNAPSHOTS = Path(__file__).parent / "snapshots" / "kernels"
SNAPSHOT_KEYS = [
    "matrix-l2-gd-after-online-c1-bt64-dk64-dv64-fp32",  # DeltaNet
    "matrix-l2-gd-before-online-c1-bt32-dk128-dv128-bf16",  # Gated DeltaNet, bf16, head dim 128 (block 32)
    "matrix-dot-gd-after-online-c1-bt64-dk64-dv64-fp32",  # linear attention
    "matrix-l2-gd-after-boundary-c16-bt16-dk32-dv32-fp32",  # a chunked (Titans-style) matrix memory
    "matrix-l2-dgd-after-before-c1-bt64-dk64-dv64-fp32",  # DGD
    "matrix-dot-dgd-after-online-c64-bt64-dk64-dv64-fp32",
    "matrix-l2-momentum_gd-after-online-c16-bt16-dk64-dv64-fp32",  # Titans' optimizer on a matrix memory
    "matrix-l2-momentum_gd-before-before-c1-bt64-dk64-dv64-bf16",
    "mlp-l2-gd-online-c16-d64-h256-ln-fp32",  # a Titans-sized MLP memory x + LN(W1 silu(W2 x))
    "mlp-dot-gd-before-c32-d32-h64-plain-bf16",
]
# The Triton language API the templates may use: all of it exists in Triton 3.6 (the GPU machines) and 3.9.
TRITON_36_API = {"arange", "load", "store", "dot", "trans", "where", "exp", "sum", "zeros", "full", "program_id"}
TRITON_36_API |= {"float32", "sqrt"}


def _all_keys() -> list[MatrixKernelKey]:
    keys = []
    for objective, optimizer, decay, read, (chunk, block), dtype in itertools.product(
        ("dot", "l2"), ("gd", "dgd", "momentum_gd"), ("after", "before"), ("online", "before", "boundary"),
        ((1, 64), (1, 16), (16, 16), (64, 64)), ("fp32", "bf16"),
    ):  # fmt: skip
        if optimizer == "dgd" and decay == "before":
            continue
        keys.append(MatrixKernelKey(objective, optimizer, decay, read, chunk, block, 32, 32, dtype))
    for objective, read, chunk, norm, dtype in itertools.product(
        ("dot", "l2"), ("online", "before", "boundary"), (16, 64), (False, True), ("fp32", "bf16")
    ):
        keys.append(MLPKernelKey(objective, read, chunk, 32, 128, norm, dtype))
    return keys


@pytest.mark.parametrize("text", SNAPSHOT_KEYS)
def test_generated_source_matches_its_snapshot(text: str):
    source = source_for(text)
    path = SNAPSHOTS / f"{text}.py.snap"
    if os.environ.get("NESTC_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    assert path.is_file(), f"no snapshot {path.name}: run with NESTC_UPDATE_SNAPSHOTS=1 and review it"
    assert source == path.read_text(encoding="utf-8"), f"{text}: generated source changed (NESTC_UPDATE_SNAPSHOTS=1)"


def test_every_key_has_its_own_source_and_it_is_cached():
    keys = _all_keys()
    sources = {render(key).source for key in keys}
    assert len(sources) == len(keys)
    assert render_matrix(keys[0]) is render_matrix(MatrixKernelKey.parse(keys[0].text()))


def test_sources_parse_and_use_only_the_triton_36_api():
    for key in _all_keys()[::7]:
        tree = ast.parse(render(key).source)
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "tl"}
        assert used <= TRITON_36_API, used - TRITON_36_API
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"forward_kernel", "backward_kernel"} <= functions


@pytest.mark.parametrize(
    "bad",
    [
        "matrix-l2-gd-after-online-c1-bt64-dk64-dv64-fp16",
        "matrix-l2;import os-gd-after-online-c1-bt64-dk64-dv64-fp32",
        "matrix-l2-gd-after-online-c3-bt64-dk64-dv64-fp32",
        "matrix-l2-gd-after-online-c1-bt64-dk48-dv64-fp32",
        "matrix-l2-dgd-before-online-c1-bt64-dk64-dv64-fp32",
        "matrix-l2-gd-after-online-c1-bt64-dk1e3-dv64-fp32",
        "mlp-l2-gd-after-online-c1-bt64-dk64-dv64-fp32",
    ],
)
def test_only_validated_keys_reach_the_templates(bad: str):
    with pytest.raises(ValueError):
        source_for(bad)


def test_sections_map_lines_to_statements():
    kernel = render_matrix(MatrixKernelKey.parse(SNAPSHOT_KEYS[0]))
    lines = kernel.source.splitlines()
    assert {s.statement for s in kernel.sections} == {"memory", "objective", "optimizer", "update", "read"}
    for section in kernel.sections:
        assert lines[section.first - 1].strip() == f"# nest: {section.statement}"
        assert section.first <= section.last <= len(lines)
    assert sections_of("x = 1\n") == ()


def test_nestc_compile_writes_kernels_and_line_maps(tmp_path: Path):
    result = CliRunner().invoke(cli, ["compile", "specs/gated_deltanet.nest", "-o", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "kernels/memory.map.json" in json.loads(result.output)["files"]
    line_map = json.loads((tmp_path / "kernels" / "memory.map.json").read_text())
    spec = Path("specs/gated_deltanet.nest").read_text().splitlines()
    for kernel in line_map["kernels"]:
        source = (tmp_path / "kernels" / kernel["file"]).read_text()
        assert f'KEY = "{kernel["key"]}"' in source
        for section in kernel["sections"]:
            _, line, col = section["nest"].rsplit(":", 2)
            statement = spec[int(line) - 1][int(col) - 1 :]
            assert statement.startswith(section["statement"]), (section, statement)
    keys = {kernel["key"] for kernel in line_map["kernels"]}
    assert keys == {f"matrix-l2-gd-before-online-c1-bt64-dk32-dv32-{d}" for d in ("fp32", "bf16")}


def test_compiled_directory_runs_without_the_compiler(tmp_path: Path):
    """The runtime finds a compiled directory's kernels on disk with no generator installed."""
    CliRunner().invoke(cli, ["compile", "specs/gated_deltanet.nest", "-o", str(tmp_path)], catch_exceptions=False)
    script = f"""
import sys
sys.modules["nestc"] = None  # the compiler cannot be imported
import nestc_runtime
from nestc_runtime.kernels import source
from nestc_runtime.kernels.key import MatrixKernelKey
nestc_runtime.load({str(tmp_path)!r})
assert not source.has_generator()
path = source._find(MatrixKernelKey.parse("matrix-l2-gd-before-online-c1-bt64-dk32-dv32-fp32"))
print(path)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NESTC_KERNEL_CACHE"] = str(tmp_path / "empty-cache")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path / "kernels"))


AOT_KEYS = [  # one key per path through the template, small shapes (ptxas time grows fast with them)
    "matrix-l2-gd-after-online-c1-bt16-dk16-dv16-fp32",
    "matrix-dot-dgd-after-before-c1-bt16-dk16-dv16-fp32",
    "matrix-l2-gd-before-boundary-c16-bt16-dk16-dv16-fp32",
    "matrix-l2-dgd-after-online-c16-bt16-dk16-dv32-bf16",
    "matrix-l2-momentum_gd-before-online-c1-bt16-dk16-dv16-fp32",
    "matrix-dot-momentum_gd-after-before-c16-bt16-dk16-dv16-bf16",
    "mlp-l2-gd-online-c16-d16-h32-ln-fp32",
    "mlp-dot-gd-before-c16-d16-h32-plain-bf16",
]
AOT_SCRIPT = """
import importlib.util, json, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nestc.codegen import render
from nestc_runtime.kernels.key import parse_key

out = {}
for text in sys.argv[1:]:
    key = parse_key(text)
    path = tempfile.mkdtemp() + f"/{key.digest()}.py"
    open(path, "w").write(render(key).source)
    spec = importlib.util.spec_from_file_location(key.digest(), path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key.digest()] = module
    spec.loader.exec_module(module)
    io = "*bf16" if key.dtype == "bf16" else "*fp32"
    kinds = {"q": io, "k": io, "v": io, "o": io, "do": io, "dq": io, "dk": io, "dv": io}
    kinds.update(lengths="*i32", T="i32", NB="i32")
    for name in ("forward_kernel", "backward_kernel"):
        fn = getattr(module, name)
        signature = {arg: kinds.get(arg, "*fp32") for arg in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature, constexprs={})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        out[f"{text}:{name}"] = sorted(compiled.asm)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90_without_a_gpu(tmp_path: Path):
    """Triton's ahead-of-time path (ASTSource, GPUTarget("cuda", 90, 32)) down to a cubin, in a process
    where Triton compiles (this test session may have it interpreting)."""
    pytest.importorskip("triton", reason="needs the triton package (a project dependency on Linux)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, not a cache hit
    done = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT, *AOT_KEYS], capture_output=True, text=True, env=env, timeout=600
    )
    if done.returncode != 0 and "ptxas" in done.stderr and "No such file" in done.stderr:
        pytest.xfail(f"environment: Triton's bundled ptxas is missing here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(compiled) == 2 * len(AOT_KEYS)
    assert all("cubin" in stages and "ptx" in stages for stages in compiled.values())


def test_kernels_that_would_not_fit_a_gpu_block_are_not_chosen():
    """sm_90 gives a block at most 227 KB of shared memory; the sizes triton.compile reported for the
    backward kernels decide the block at C = 1 and which keys exist (runtime/kernels/key.py, fits_sm90)."""
    from nestc_runtime.kernels.key import block_for_chunk, fits_sm90, parse_key

    assert block_for_chunk(1, 64) == 64 and block_for_chunk(1, 128) == 32 and block_for_chunk(4) is None
    assert fits_sm90(parse_key("matrix-l2-gd-before-online-c1-bt32-dk128-dv128-bf16"))
    assert not fits_sm90(parse_key("matrix-l2-gd-before-online-c1-bt64-dk128-dv128-bf16"))
    assert not fits_sm90(parse_key("matrix-l2-gd-after-online-c32-bt32-dk128-dv128-bf16"))
    assert fits_sm90(parse_key("matrix-l2-momentum_gd-before-online-c1-bt64-dk64-dv64-bf16"))
    assert fits_sm90(parse_key("mlp-l2-gd-online-c16-d64-h128-ln-bf16"))
    assert not fits_sm90(parse_key("mlp-l2-gd-online-c16-d64-h256-ln-bf16"))

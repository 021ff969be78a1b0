"""Resource limits: the memory estimate made before anything is allocated, the refusal, and `--force`.

The estimate is checked against the measured peak of real `nestc train` runs: a subprocess per run reports its
`ru_maxrss`, and the peak of a tiny run of the same command (imports, allocator, plotting) is subtracted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nestc import resources
from nestc.cli import main
from nestc.pipeline import front_end, to_plan

ROOT = Path(__file__).parents[1]
DELTANET = str(ROOT / "specs" / "deltanet.nest")
TINY = ["--set", "d=16", "--batch", "1", "--seq-len", "8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert (
        main(["train", DELTANET, *TINY, "--data", str(corpus), "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    )
    return out


def _plan(spec: str, **params: float):  # type: ignore[no-untyped-def]
    return to_plan(front_end(spec, params))


# ---- the estimate's parts ------------------------------------------------------------------------------------


def test_parameter_count_is_exact_without_allocating() -> None:
    from nestc_runtime import CompiledModel

    plan = _plan(DELTANET, d=32)
    assert resources.count_parameters(plan) == sum(p.numel() for p in CompiledModel(plan).parameters())


def test_estimate_grows_with_batch_length_and_width() -> None:
    small = resources.estimate(_plan(DELTANET, d=32), 2, 64, training=True)
    assert resources.estimate(_plan(DELTANET, d=32), 4, 64, training=True).activations == 2 * small.activations
    assert resources.estimate(_plan(DELTANET, d=32), 2, 128, training=True).activations > small.activations
    assert resources.estimate(_plan(DELTANET, d=64), 2, 64, training=True).total > small.total
    # AdamW keeps two moments per parameter; a checkpoint copies weights and moments while it is written
    assert small.optimizer == 2 * small.weights and small.checkpoint == small.weights + small.optimizer
    inference = resources.estimate(_plan(DELTANET, d=32), 2, 64, training=False)
    assert inference.gradients == inference.optimizer == 0 and inference.total < small.total


def test_available_memory_reads_the_machine() -> None:
    room = resources.available_memory()
    assert room is None or 0 < room < 2**50
    if Path("/proc/meminfo").is_file():
        assert resources._meminfo_available() is not None


# ---- refusal and --force through the commands ------------------------------------------------------------------


def test_train_refuses_a_run_larger_than_the_machine(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "available_memory", lambda: 10 * 2**20)
    args = ["train", DELTANET, *TINY, "--data", str(corpus), "--steps", "1", "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "needs about" in err and "only 10.0 MiB is available" in err and "--force" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert not (tmp_path / "a").exists()  # refused before anything was allocated or written
    assert main([*args, "--out", str(tmp_path / "b"), "--force"]) == 0


def test_eval_and_generate_refuse_and_force(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "available_memory", lambda: 2**20)
    evaluate = ["eval", DELTANET, "--set", "d=16", "--ckpt", str(run_dir), "--task", "memorize"]
    generate = ["generate", DELTANET, "--set", "d=16", "--ckpt", str(run_dir), "--prompt", "hi", "--max-tokens", "2"]
    for args in (evaluate, generate):
        capsys.readouterr()
        assert main(args) == 1
        assert "--force" in capsys.readouterr().err
        assert main([*args, "--force"]) == 0


def test_a_huge_request_is_refused_on_this_machine(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No monkeypatching: d = 65536 at batch 64 x 65536 tokens cannot fit anywhere this suite runs."""
    args = ["train", DELTANET, "--set", "d=65536", "--set", "heads=2", "--batch", "64", "--seq-len", "65536"]
    capsys.readouterr()
    assert main([*args, "--data", str(corpus), "--steps", "1", "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    assert "--force" in capsys.readouterr().err


def test_sizes_beyond_what_pytorch_can_describe_are_refused_even_with_force(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """d = 1e12 overflows a tensor's element count (it was exit 70 from the meta-device build)."""
    for d in ("1e12", "1e300"):
        args = ["train", DELTANET, "--set", f"d={d}", "--data", str(corpus), "--steps", "1", "--force"]
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / "r"), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "cannot be built at all" in err and "Traceback" not in err and "internal error" not in err


# ---- the estimate against measured peaks -----------------------------------------------------------------------

# The peak is VmHWM of /proc/self/status (in KiB): it belongs to the process's own address space, which exec
# makes fresh. ru_maxrss would not do: Linux carries it across fork and exec, so a child of a large pytest
# process reports the parent's peak.
PEAK = (
    "import sys\n"
    "from nestc.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "print('PEAK', hwm[0], code)\n"
)


def _peak_bytes(spec: str, d: int, batch: int, seq_len: int, corpus: Path, out: Path) -> int:
    """The peak resident memory of `nestc train` (2 steps, a checkpoint at the end) in a fresh process."""
    args = ["train", spec, "--set", f"d={d}", "--data", str(corpus), "--steps", "2", "--out", str(out)]
    args += ["--batch", str(batch), "--seq-len", str(seq_len), "--no-progress", "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, env=env, check=False)
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("PEAK")]
    assert lines and lines[0][2] == "0", done.stderr[-3000:]
    return int(lines[0][1]) * 1024


MEASURED = [
    pytest.param("transformer.nest", 256, 8, 256, id="transformer"),  # attention and SwiGLU
    pytest.param("deltanet.nest", 256, 8, 256, id="deltanet"),  # matrix memory, parallel form
    pytest.param("ttt_mlp.nest", 128, 4, 256, id="ttt_mlp"),  # MLP memory
]


@pytest.fixture(scope="module")
def baseline_peak(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    return _peak_bytes(DELTANET, 16, 1, 8, corpus, tmp_path_factory.mktemp("baseline") / "run")


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "d", "batch", "seq_len"), MEASURED)
def test_estimate_is_within_twice_the_measured_peak(
    spec: str, d: int, batch: int, seq_len: int, corpus: Path, baseline_peak: int, tmp_path: Path
) -> None:
    path = str(ROOT / "specs" / spec)
    measured = _peak_bytes(path, d, batch, seq_len, corpus, tmp_path / "run") - baseline_peak
    estimated = resources.estimate(_plan(path, d=d), batch, seq_len, training=True).total - resources.BASELINE
    assert measured > 50 * 2**20, f"the run is too small to measure: {measured} bytes"
    ratio = estimated / measured
    print(f"{spec} d={d} {batch}x{seq_len}: estimate {resources.human(estimated)}, peak {resources.human(measured)}")
    assert 0.5 <= ratio <= 2.0, f"estimate {resources.human(estimated)} vs measured {resources.human(measured)}"


@pytest.mark.parametrize("spec", ["titans_selfmod", "hope", "titans_lmm", "ttt_mlp", "hope_attention", "atlas"])
def test_activation_estimate_matches_what_autograd_saves(spec: str) -> None:
    """The per-token activation estimate against the bytes autograd actually saves in a forward (saved-tensor
    hooks, each storage once). A level's producers count too: self-modifying Titans' M_k, M_v, M_η, M_α run
    their own memory ops in every window (before they were left out, HOPE was estimated at 1/6 of its use)."""
    import torch

    import nestc_runtime

    plan = _plan(str(ROOT / "specs" / f"{spec}.nest"), d=32, heads=2)
    torch.manual_seed(0)
    model = nestc_runtime.build(plan)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randint(0, 256, (4, 64)))
    saved = sum(storages.values())
    estimated = resources.estimate(plan, 4, 64, training=True).activations / resources.WORKSPACE
    assert 0.8 < estimated / saved < 2.0, (
        f"{spec}: estimated {estimated / 1e6:.1f} MB, autograd saved {saved / 1e6:.1f} MB"
    )

"""The compiled scan of the matrix memory (DESIGN §3): every combination without a parallel form (W003) runs
``reference.step`` in ``torch.compile``d blocks; outputs, carried state and the gradients of every input must
equal the eager oracle ``reference.scan``.  The tests compile blocks of 2 tokens (compile time grows with the
block; the code is the same for any length): T = 8 runs one eager token (the fresh state gains requires_grad),
three compiled blocks, the carry threaded between them, and one eager tail token; rows have different lengths
(padding inside the compiled blocks).

Compile time (inductor's C++ build of a forward and a backward, ~10 s CPU per configuration) keeps inductor to a
few cases; every case is also compiled with the "aot_eager" backend, which captures the same graphs (dynamo, the
autograd of detaches and masks) without generating code."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

from nestc_runtime.ops import compiled_scan
from nestc_runtime.ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState, chunked, scan
from nestc_runtime.ops.matrix_memory.chunked import has_parallel_form
from nestc_runtime.ops.matrix_memory.momentum import has_momentum_form

B, H, DK, DV, T, WINDOW = 2, 2, 4, 4, 8, 2  # dv = dk: the residual output map adds q
LENGTHS = torch.tensor([T, 5])

# Every W003 case of a matrix memory (nestc/checks/rules.py), with a spread of reads and gradient modes.
CASES: dict[str, tuple[MatrixMemoryConfig, bool]] = {  # name -> (config, per-channel α)
    "momentum_gd every token": (MatrixMemoryConfig("l2", "after", 1, "online", optimizer="momentum_gd"), True),
    "momentum_gd decay before, truncate": (
        MatrixMemoryConfig("l2", "before", 2, "before", grad="truncate", optimizer="momentum_gd"),
        False,
    ),
    "newton_schulz": (MatrixMemoryConfig("dot", "after", 1, "online", optimizer="newton_schulz", steps=2), False),
    "delta_momentum, stop": (
        MatrixMemoryConfig("l2", "after", 1, "online", grad="stop", optimizer="delta_momentum", lam=0.5),
        False,
    ),
    "dgd huber": (MatrixMemoryConfig("huber", "after", 1, "online", optimizer="dgd", delta=0.5), True),
    "dgd lp, boundary": (MatrixMemoryConfig("lp", "after", 2, "boundary", optimizer="dgd", p=3.0), False),
    "dgd with an output map": (
        MatrixMemoryConfig("l2", "after", 1, "online", optimizer="dgd", residual=True, norm=True),
        False,
    ),
    "windowed momentum_gd": (
        MatrixMemoryConfig("l2", "after", 1, "online", optimizer="momentum_gd", window=WINDOW),
        False,
    ),
}


def make(cfg: MatrixMemoryConfig, per_channel: bool, dtype: torch.dtype, seed: int) -> dict[str, Tensor]:
    """Fresh leaf inputs; keys and values as (B,H,T,c,d) stacks for a windowed objective."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    stack = (WINDOW,) if cfg.window > 1 else ()
    xs = {
        "q": rand(B, H, T, DK),
        "k": torch.nn.functional.normalize(rand(B, H, T, *stack, DK), dim=-1),
        "v": rand(B, H, T, *stack, DV),
        "lr": 0.5 * torch.sigmoid(rand(B, H, T)),
        "retain": 0.5 + 0.5 * torch.sigmoid(rand(*((B, H, T, DK) if per_channel else (B, H, T))) + 1.0),
        "init": 0.3 * rand(H, DV, DK),
    }
    if cfg.optimizer in ("momentum_gd", "newton_schulz"):
        xs["beta"] = 0.9 * torch.sigmoid(rand(B, H, T))
    return {name: x.requires_grad_() for name, x in xs.items()}


def run(op: Any, xs: dict[str, Tensor], cfg: MatrixMemoryConfig, lengths: Tensor | None = LENGTHS) -> Any:
    state = MatrixMemoryState.initial(xs["init"], B)
    return op(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg, lengths=lengths, momentum=xs.get("beta"))


def outputs_and_grads(op: Any, xs: dict[str, Tensor], cfg: MatrixMemoryConfig) -> list[Tensor]:
    """o, the carried S, m, P, log_decay, and ∂L/∂(every input) for a fixed random L = ⟨o, w⟩ + ⟨S, w'⟩ + ⟨m, w''⟩."""
    o, state = run(op, xs, cfg)
    gen = torch.Generator().manual_seed(99)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in (o, state.S, state.momentum))
    grads = torch.autograd.grad(loss, list(xs.values()), allow_unused=True)
    values = [o, state.S, state.momentum, state.P, state.log_decay, state.phase, state.chunks_done]
    return values + [torch.zeros_like(x) if g is None else g for x, g in zip(xs.values(), grads, strict=True)]


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _compiled(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(compiled_scan, "BLOCK", 2)
    monkeypatch.setattr(compiled_scan, "WARMUP_STEPS", 0)
    compiled_scan.set_compiled_scan(True)
    yield
    compiled_scan.set_compiled_scan(True)


@pytest.mark.parametrize(
    "name,backend",
    [(name, "aot_eager") for name in CASES] + [("newton_schulz", "inductor"), ("delta_momentum, stop", "inductor")],
)
def test_compiled_scan_equals_the_oracle(monkeypatch: pytest.MonkeyPatch, name: str, backend: str) -> None:
    monkeypatch.setattr(compiled_scan, "BACKEND", backend)
    cfg, per_channel = CASES[name]
    xs = make(cfg, per_channel, torch.float64, seed=len(name))
    state = MatrixMemoryState.initial(xs["init"], B)
    assert not has_parallel_form(cfg, xs["retain"], state)
    assert not has_momentum_form(cfg, xs["retain"], xs.get("beta"), state)
    before = compiled_scan.counts()
    got = outputs_and_grads(chunked, xs, cfg)
    after = compiled_scan.counts()
    assert after == {"compiled": before["compiled"] + 1, "failed": before["failed"]}, "one compiled block"
    want = outputs_and_grads(scan, xs, cfg)
    names = ["o", "S", "m", "P", "log_decay", "phase", "chunks_done", *(f"grad {n}" for n in xs)]
    for label, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape, label
        assert rel_err(a, b) < 1e-10, f"{label}: relative error {rel_err(a, b):.1e}"


def test_fp32_and_streaming() -> None:
    """fp32 within float tolerance, fed in two pieces (5 + 3 tokens, the state carried) against one oracle call."""
    cfg, per_channel = CASES["momentum_gd every token"]
    xs = make(cfg, per_channel, torch.float32, seed=3)
    want, want_state = run(scan, xs, cfg, lengths=None)
    state = MatrixMemoryState.initial(xs["init"], B)
    pieces = []
    for part in (slice(0, 5), slice(5, T)):
        o, state = chunked(
            xs["q"][:, :, part],
            xs["k"][:, :, part],
            xs["v"][:, :, part],
            xs["lr"][:, :, part],
            xs["retain"][:, :, part],
            state,
            cfg,
            momentum=xs["beta"][:, :, part],
        )
        pieces.append(o)
    assert rel_err(torch.cat(pieces, 2), want) < 1e-5
    assert rel_err(state.S, want_state.S) < 1e-5
    assert rel_err(state.momentum, want_state.momentum) < 1e-5


def test_a_short_job_stays_eager_until_the_warm_up_is_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled_scan, "WARMUP_STEPS", 2 * T)
    monkeypatch.setattr(compiled_scan, "BACKEND", "aot_eager")
    for name, fresh in (("_COMPILED", {}), ("_FAILED", set()), ("_SEEN", {})):
        monkeypatch.setattr(compiled_scan, name, fresh)
    cfg, per_channel = CASES["momentum_gd decay before, truncate"]
    xs = make(cfg, per_channel, torch.float64, seed=11)
    results = []
    for call in range(3):  # T tokens a call: eager, eager, then compiled
        results.append(run(chunked, xs, cfg)[0])
        assert compiled_scan.counts()["compiled"] == (call == 2)
    want = run(scan, xs, cfg)[0]
    assert all(rel_err(o, want) < 1e-12 for o in results)


def test_switched_off_runs_eagerly() -> None:
    cfg, per_channel = CASES["newton_schulz"]
    xs = make(cfg, per_channel, torch.float64, seed=5)
    compiled_scan.set_compiled_scan(False)
    before = compiled_scan.counts()
    o, _ = run(chunked, xs, cfg)
    assert compiled_scan.counts() == before
    assert rel_err(o, run(scan, xs, cfg)[0]) < 1e-12


def test_no_compiler_falls_back_to_eager_with_one_note(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Without a working C++ compiler inductor fails at the first call: the scan warns once and runs eagerly."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-c++")))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # no compiled kernel to reuse
    monkeypatch.setattr(compiled_scan, "_NOTED", [])
    monkeypatch.setattr(compiled_scan, "_FAILED", set())
    monkeypatch.setattr(compiled_scan, "_COMPILED", {})
    monkeypatch.setattr(compiled_scan, "_SEEN", {})
    cfg = MatrixMemoryConfig("dot", "after", 1, "before", optimizer="newton_schulz", steps=1)
    xs = make(cfg, False, torch.float64, seed=7)
    with pytest.warns(RuntimeWarning, match="compiled scan unavailable"):
        first, _ = run(chunked, xs, cfg)
    assert compiled_scan.counts() == {"compiled": 0, "failed": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = run(chunked, xs, cfg)
    want, _ = run(scan, xs, cfg)
    assert rel_err(first, want) < 1e-12 and rel_err(again, want) < 1e-12

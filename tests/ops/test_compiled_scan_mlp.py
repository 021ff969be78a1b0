"""The compiled scan of the MLP memory: the combinations without a parallel form (Newton–Schulz,
delta_momentum, a windowed objective with an optimizer other than gd, any optimizer every token) run
``reference.step`` in ``torch.compile``d blocks (``runtime/ops/compiled_scan.py``); outputs, carried state
and the gradients of every input must equal the eager oracle ``reference.scan``. Blocks of 2 tokens, the
"aot_eager" backend (the same graph capture and autograd as inductor without its C++ build; the inductor
path is covered by the matrix memory's tests, the utility being the same), rows of different lengths."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from nestc_runtime.ops import compiled_scan
from nestc_runtime.ops.mlp_memory import MLPMemoryConfig, MLPMemoryState, chunked, has_parallel_form, scan

B, H, D, HID, T, WINDOW = 2, 2, 4, 8, 8, 2
LENGTHS = torch.tensor([T, 5])

CASES = {
    "newton_schulz with momentum": MLPMemoryConfig("l2", 1, "online", optimizer="newton_schulz", steps=2),
    "delta_momentum, stop": MLPMemoryConfig("l2", 2, "before", "stop", optimizer="delta_momentum", lam=0.5),
    "windowed momentum_gd, LN": MLPMemoryConfig("l2", 1, "online", optimizer="momentum_gd", norm=True, window=WINDOW),
    "newton_schulz gelu, truncate": MLPMemoryConfig(
        "dot", 2, "boundary", "truncate", optimizer="newton_schulz", steps=2, activation="gelu"
    ),
    "gd every token": MLPMemoryConfig("l2", 1, "online", optimizer="gd"),
    "dgd every token, LN": MLPMemoryConfig("l2", 1, "online", optimizer="dgd", norm=True),
    "momentum_gd every token, stop": MLPMemoryConfig("l2", 1, "before", "stop", optimizer="momentum_gd"),
}


def make(cfg: MLPMemoryConfig, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    stack = (WINDOW,) if cfg.window > 1 else ()
    xs = {
        "q": rand(B, H, T, D),
        "k": 0.7 * rand(B, H, T, *stack, D),
        "v": rand(B, H, T, *stack, D),
        "lr": 0.2 * torch.sigmoid(rand(B, H, T)),
        "retain": 0.8 + 0.2 * torch.sigmoid(rand(B, H, T) + 1.0),
        "beta": 0.9 * torch.sigmoid(rand(B, H, T)),
        "init1": 0.4 * rand(H, D, HID),
        "init2": 0.4 * rand(H, HID, D),
    }
    return {name: x.requires_grad_() for name, x in xs.items()}


def outputs_and_grads(op: Any, xs: dict[str, Tensor], cfg: MLPMemoryConfig) -> list[Tensor]:
    state = MLPMemoryState.initial(xs["init1"], xs["init2"], B)
    beta = xs["beta"] if cfg.optimizer in ("momentum_gd", "newton_schulz") else None
    o, after = op(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg, lengths=LENGTHS, momentum=beta)
    gen = torch.Generator().manual_seed(99)
    carried = (after.W1, after.W2, after.M1, after.M2)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in (o, *carried))
    grads = torch.autograd.grad(loss, list(xs.values()), allow_unused=True)
    values = [o, *carried, after.P1, after.P2, after.phase, after.chunks_done]
    return values + [torch.zeros_like(x) if g is None else g for x, g in zip(xs.values(), grads, strict=True)]


@pytest.fixture(autouse=True)
def _compiled(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(compiled_scan, "BLOCK", 2)
    monkeypatch.setattr(compiled_scan, "WARMUP_STEPS", 0)
    monkeypatch.setattr(compiled_scan, "BACKEND", "aot_eager")
    compiled_scan.set_compiled_scan(True)
    yield
    compiled_scan.set_compiled_scan(True)


@pytest.mark.parametrize("name", CASES)
def test_compiled_scan_equals_the_oracle(name: str) -> None:
    cfg = CASES[name]
    xs = make(cfg, seed=len(name))
    assert not has_parallel_form(cfg, xs["retain"], xs["beta"])
    before = compiled_scan.counts()
    got = outputs_and_grads(chunked, xs, cfg)
    assert compiled_scan.counts() == {"compiled": before["compiled"] + 1, "failed": before["failed"]}
    want = outputs_and_grads(scan, xs, cfg)
    labels = ["o", "W1", "W2", "M1", "M2", "P1", "P2", "phase", "chunks_done", *(f"grad {n}" for n in xs)]
    for label, a, b in zip(labels, got, want, strict=True):
        assert a.shape == b.shape, label
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < 1e-10, f"{label}: relative error {err:.1e}"


SPEC = """system s(d = 16, heads = 2, vocab = 257) {
  level train { update every step; optimizer adamw(lr = 1e-3) }
  level m in train {
    memory mlp(depth = 2, expand = 2, residual) per head
    queries linear(x); keys linear(x); values linear(x)
    objective l2(m(keys), values); optimizer OPTIMIZER
    update every token
  }
  model = embed -> m -> head
}
"""


@pytest.mark.parametrize(
    "optimizer,wording",
    [
        ("newton_schulz(lr = 0.1)", "a compiled scan"),
        ("delta_momentum(lr = 0.1)", "a compiled scan"),
        ("gd(lr = 0.1)", "a compiled scan"),
    ],
)
def test_w003_says_which_scans_are_compiled(optimizer: str, wording: str, tmp_path: Any) -> None:
    from nestc.pipeline import front_end

    path = tmp_path / "s.nest"
    path.write_text(SPEC.replace("OPTIMIZER", optimizer))
    (warning,) = [w for w in front_end(path).warnings if w.code == "W003"]
    assert f"runs as {wording}, token by token" in warning.message

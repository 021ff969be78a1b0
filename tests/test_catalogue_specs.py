"""Specs using the catalogue's `lp`, `huber`, `newton_schulz` and `delta_momentum` compile and run, and the
chunked backend equals the reference interpreter on the whole model (logits and every parameter's gradient)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

import nestc
from nestc.pipeline import front_end, to_plan

F64 = torch.float64
EOD = 256
TOL = 1e-9  # both backends in float64

MATRIX = """
system catalogue_matrix(d = 16, heads = 2, layers = 2, vocab = 257) {{
  level pretrain {{ update every step; optimizer adamw(lr = 3e-3, weight_decay = 0.1) }}

  level memory in pretrain {{
    memory    matrix per head
    queries   linear(x) |> l2norm
    keys      linear(x) |> l2norm
    values    linear(x)
    objective {objective}
    optimizer {optimizer}
    {decay}update every {every}; read online; outer gradient through
  }}

  block = residual(rmsnorm -> memory -> linear)
  model = embed -> block * layers -> rmsnorm -> head
}}
"""

MLP = """
system catalogue_mlp(d = 16, heads = 2, layers = 1, vocab = 257) {{
  level pretrain {{ update every step; optimizer adamw(lr = 4e-4, weight_decay = 0.1) }}

  level memory in pretrain {{
    memory    mlp(residual, depth = 2, expand = 2{norm}) per head
    queries   linear(x) |> l2norm
    keys      linear(x) |> l2norm
    values    linear(x)
    objective {objective}
    optimizer {optimizer}
    update every {every}; read online; outer gradient through
  }}

  block = residual(rmsnorm -> memory -> linear)
  model = embed -> block * layers -> rmsnorm -> head
}}
"""

CASES = {
    # the brief's DeltaNet copy with a Huber objective
    "deltanet_huber": (
        MATRIX,
        {
            "objective": "huber(memory(keys), values, delta = 0.5)",
            "optimizer": "gd(lr = sigmoid(linear(x)) per head, retain = 1)",
            "every": "token",
        },
    ),
    "matrix_lp_chunk4_before": (
        MATRIX,
        {
            "objective": "lp(memory(keys), values, p = 3)",
            "optimizer": "gd(lr = sigmoid(linear(x)) * 0.5, retain = sigmoid(linear(x)))",
            "decay": "decay before; ",
            "every": "4 tokens",
        },
    ),
    "matrix_newton_schulz": (
        MATRIX,
        {
            "objective": "l2(memory(keys), values)",
            "optimizer": "newton_schulz(lr = 0.1, momentum = 0.9, retain = sigmoid(linear(x)), steps = 3)",
            "every": "4 tokens",
        },
    ),
    "matrix_delta_momentum": (
        MATRIX,
        {
            "objective": "huber(memory(keys), values, delta = 1)",
            "optimizer": "delta_momentum(lr = sigmoid(linear(x)) * 0.3, retain = 0.9, lam = 0.5)",
            "every": "token",
        },
    ),
    "mlp_newton_schulz": (
        MLP,
        {
            "objective": "l2(memory(keys), values)",
            "optimizer": "newton_schulz(lr = 0.1, momentum = 0.9, steps = 3)",
            "every": "4 tokens",
        },
    ),
    "mlp_lp_layernorm": (
        MLP,
        {
            "objective": "lp(memory(keys), values, p = 3)",
            "optimizer": "momentum_gd(lr = sigmoid(linear(x)) * 0.1, momentum = sigmoid(linear(x)), retain = 1)",
            "every": "4 tokens",
            "norm": ", norm = layernorm",
        },
    ),
    "mlp_delta_momentum_huber": (
        MLP,
        {
            "objective": "huber(memory(keys), values, delta = 0.5)",
            "optimizer": "delta_momentum(lr = 0.1, retain = sigmoid(linear(x)))",
            "every": "2 tokens",
        },
    ),
}


def write_spec(tmp_path: Path, name: str) -> Path:
    template, fields = CASES[name]
    path = tmp_path / f"{name}.nest"
    path.write_text(template.format(**{"decay": "", "norm": "", **fields}))
    return path


def param_grads(model: torch.nn.Module, loss: Tensor) -> dict[str, Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads, strict=True)}


def rel_err(a: Tensor, b: Tensor) -> float:
    diff = (a - b).pow(2).mean().sqrt().item()
    scale = b.pow(2).mean().sqrt().item()
    return diff / scale if scale > 0 else diff


@pytest.mark.parametrize("name", list(CASES))
def test_plan_carries_the_catalogue(tmp_path: Path, name: str) -> None:
    plan = to_plan(front_end(write_spec(tmp_path, name)))
    level = plan.levels["memory"]
    fields = CASES[name][1]
    assert level.objective == fields["objective"].split("(")[0]
    assert level.optimizer == fields["optimizer"].split("(")[0]
    if level.objective == "lp":
        assert level.p == 3
    if level.objective == "huber":
        assert level.delta == float(fields["objective"].split("delta = ")[1].rstrip(")"))
    if level.optimizer == "newton_schulz":
        assert level.steps == 3
    if level.optimizer == "delta_momentum":
        assert level.lam == (0.5 if "lam" in fields["optimizer"] else 1.0)
    # the plan's JSON form round-trips through the runtime's validation
    assert type(plan).from_json(plan.to_json()).levels["memory"] == level


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_equals_reference(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = nestc.compile(write_spec(tmp_path, name), backend="reference").to(F64)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, EOD, (2, 11), generator=gen)
    weights = torch.randn(2, 11, 257, generator=gen, dtype=F64)
    results = {}
    for backend in ("reference", "chunked"):
        model.backend = backend
        logits = model(tokens)
        assert torch.isfinite(logits).all()
        results[backend] = (logits.detach(), param_grads(model, (logits * weights).sum()))
    ref_logits, ref_grads = results["reference"]
    got_logits, got_grads = results["chunked"]
    assert rel_err(got_logits, ref_logits) <= TOL
    assert got_grads.keys() == ref_grads.keys()
    reached = 0
    for key, ref in ref_grads.items():
        assert torch.isfinite(got_grads[key]).all(), key
        assert rel_err(got_grads[key], ref) <= TOL, key
        reached += bool(ref.abs().sum() > 0)
    assert reached > 0


def test_delta_momentum_with_decay_before_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.nest"
    template, fields = CASES["matrix_delta_momentum"]
    path.write_text(template.format(**{"norm": "", **fields, "decay": "decay before; "}))
    with pytest.raises(nestc.SpecError) as info:
        to_plan(front_end(path))
    assert "E040" in str(info.value)

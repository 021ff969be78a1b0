"""The papers' equations, written out in plain torch, against the compiled models' probed memory levels.

The expectation is built here from the probed inputs (queries, keys, values, lr, retain) alone, with no
code of the runtime: a token loop over the recurrence each spec's header states.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

import nestc

SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
SPECS = ("linear_attention", "deltanet", "gated_deltanet")
BACKENDS = ("reference", "chunked")
EOD = 256
F64 = torch.float64
SIZES = {"d": 16, "heads": 2, "layers": 2}


def compiled(spec: str, backend: str, seed: int = 0, **params: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    return nestc.compile(SPECS_DIR / f"{spec}.nest", backend=backend, **{**SIZES, **params}).double()


def tokens_for(batch: int, length: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, EOD, (batch, length), generator=gen)


def recurrence(rule: str, p: dict[str, Tensor], starts: Tensor | None = None) -> Tensor:
    """o_t = M_t q_t with M_{-1} = 0 and, per rule,
    linear:  M_t = α_t M_{t-1} + η_t v_t k_tᵀ
    delta:   M_t = M_{t-1} (I - η_t k_t k_tᵀ) + η_t v_t k_tᵀ
    gated:   M_t = α_t M_{t-1} (I - η_t k_t k_tᵀ) + η_t v_t k_tᵀ
    `starts` (B, T) bool: M returns to 0 before a document's first token."""
    q, k, v, eta, alpha = (p[n].detach() for n in ("queries", "keys", "values", "lr", "retain"))
    batch, heads, length, dk = k.shape
    M = torch.zeros(batch, heads, v.shape[-1], dk, dtype=v.dtype)
    eye = torch.eye(dk, dtype=v.dtype)
    out = []
    for t in range(length):
        if starts is not None:
            M = torch.where(starts[:, t, None, None, None], torch.zeros_like(M), M)
        k_t, v_t, q_t = k[:, :, t], v[:, :, t], q[:, :, t]
        e, a = eta[:, :, t, None, None], alpha[:, :, t, None, None]
        write = e * v_t[..., :, None] * k_t[..., None, :]
        if rule == "linear":
            M = a * M + write
        elif rule == "delta":
            M = M @ (eye - e * k_t[..., :, None] * k_t[..., None, :]) + write
        else:
            M = a * M @ (eye - e * k_t[..., :, None] * k_t[..., None, :]) + write
        out.append(M @ q_t[..., None])
    return torch.cat(out, -1).transpose(-1, -2)  # (B, H, T, dv)


RULES = {"linear_attention": "linear", "deltanet": "delta", "gated_deltanet": "gated"}


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS)
def test_probed_output_follows_the_equation(spec: str, backend: str) -> None:
    model = compiled(spec, backend)
    tokens = tokens_for(2, 40, seed=1)
    logits, probes = model(tokens, probe=True)
    assert logits.shape == (2, 40, 257)
    assert set(probes) == {"memory[0]", "memory[1]"}
    for name, p in probes.items():
        assert p["output"].shape == (2, 2, 40, 8)
        assert p["lr"].shape == p["retain"].shape == (2, 2, 40)
        err = rel_err(p["output"].detach(), recurrence(RULES[spec], p))
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("spec", SPECS)
def test_probes_agree_across_backends(spec: str) -> None:
    tokens = tokens_for(2, 21, seed=4)
    _, ref = compiled(spec, "reference")(tokens, probe=True)
    _, fast = compiled(spec, "chunked")(tokens, probe=True)
    for name in ref:
        for key in ("queries", "keys", "values", "lr", "retain", "output"):
            assert rel_err(fast[name][key].detach(), ref[name][key].detach()) < 1e-10, f"{name} {key}"


@pytest.mark.parametrize("aligned", [False, True], ids=["rows-differ", "aligned"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS)
def test_the_equation_restarts_at_each_document(spec: str, backend: str, aligned: bool) -> None:
    """Documents starting at different places in each row (repacked one per row), or at the same places
    (run one after another on the whole batch)."""
    model = compiled(spec, backend)
    tokens = tokens_for(2, 30, seed=2)
    if aligned:
        tokens[:, [3, 20]] = EOD
    else:
        tokens[0, 11] = EOD
        tokens[1, 3] = EOD
        tokens[1, 20] = EOD
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == EOD
    _, probes = model(tokens, probe=True)
    for name, p in probes.items():
        assert rel_err(p["output"].detach(), recurrence(RULES[spec], p, starts)) < 1e-10, name
        # Without the restarts the equation gives something else, so the check above has teeth.
        assert rel_err(p["output"].detach(), recurrence(RULES[spec], p)) > 1e-3, name


@pytest.mark.parametrize(("spec", "others"), (("deltanet", ("linear",)), ("gated_deltanet", ("linear", "delta"))))
def test_the_equations_are_told_apart(spec: str, others: tuple[str, ...]) -> None:
    """The delta rule's correction term and the gate both matter on these inputs (DeltaNet's retain is 1,
    so its gated form is the same equation)."""
    _, probes = compiled(spec, "reference")(tokens_for(2, 40, seed=1), probe=True)
    p = probes["memory[0]"]
    for other in others:
        assert rel_err(p["output"].detach(), recurrence(other, p)) > 1e-3, other


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS)
def test_probed_inputs_have_the_spec_shapes(spec: str, backend: str) -> None:
    _, probes = compiled(spec, backend)(tokens_for(2, 19, seed=3), probe=True)
    for name, p in probes.items():
        ones = torch.ones(2, 2, 19, dtype=F64)
        # `keys linear(x) |> l2norm` and `queries ... |> l2norm`: unit norm per head.
        for key in ("keys", "queries"):
            norms = p[key].detach().norm(dim=-1)
            assert torch.allclose(norms, ones, atol=1e-12), f"{name} {key} norms {norms.min()}..{norms.max()}"
        lr, retain = p["lr"].detach(), p["retain"].detach()
        if spec == "linear_attention":  # gd(lr = 1, retain = retain) with the spec's retain = 0.97
            assert torch.equal(lr, ones)
            assert torch.allclose(retain, 0.97 * ones, rtol=0, atol=1e-15)
        else:  # lr = sigmoid(linear(x)) per head: data dependent, in (0, 1), differing between heads
            assert ((lr > 0) & (lr < 1)).all() and lr.std() > 1e-3
            assert not torch.allclose(lr[:, 0], lr[:, 1])
        if spec == "deltanet":
            assert torch.equal(retain, ones)
        if spec == "gated_deltanet":
            assert ((retain > 0) & (retain < 1)).all() and retain.std() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_retain_parameter(backend: str) -> None:
    model = compiled("linear_attention", backend, retain=0.5)
    tokens = tokens_for(1, 12, seed=5)
    _, probes = model(tokens, probe=True)
    p = probes["memory[1]"]
    assert torch.allclose(p["retain"].detach(), torch.full((1, 2, 12), 0.5, dtype=F64), rtol=0, atol=1e-15)
    assert rel_err(p["output"].detach(), recurrence("linear", p)) < 1e-10

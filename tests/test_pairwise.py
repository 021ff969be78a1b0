"""Chunked equals reference over the runtime's combinations (DESIGN §3, issue "The runtime, complete").

Each case is a one-level spec generated from a template and compiled; the whole model runs on both
backends (outputs and the gradient of every parameter, fp64). The cases are a pairwise covering set of
memory × objective × optimizer × read × gradient mode × chunk (every pair of values appears in some case),
plus the full products for matrix and MLP memories under `l2`, each at T = C − 1, C + 1 and a prime.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import nestc

MEMORIES = ("matrix", "mlp")
OBJECTIVES = ("dot", "l2")
OPTIMIZERS = ("gd", "momentum_gd", "dgd")
READS = ("online", "before", "boundary")
GRADIENTS = ("through", "stop", "truncate 2")
CHUNKS = (1, 4, 16)
FACTORS = (MEMORIES, OBJECTIVES, OPTIMIZERS, READS, GRADIENTS, CHUNKS)

TEMPLATE = """
system case(d = 8, heads = 2, vocab = 257) {{
  level pretrain {{ update every step; optimizer adamw(lr = 1e-3) }}
  level memory in pretrain {{
    memory    {memory} per head
    queries   linear(x) |> l2norm
    keys      linear(x) |> l2norm
    values    linear(x)
    objective {objective}(memory(keys), values)
    optimizer {optimizer}
    update every {chunk} tokens; read {read}; outer gradient {gradient}
  }}
  model = embed -> residual(rmsnorm -> memory -> linear) -> head
}}
"""


def optimizer_text(kind: str) -> str:
    rates = "lr = sigmoid(linear(x)) * 0.5, retain = sigmoid(linear(x) + 2)"
    if kind == "momentum_gd":
        rates += ", momentum = sigmoid(linear(x))"
    return f"{kind}({rates})"


def pairwise_cases() -> list[tuple]:
    """A greedy pairwise covering set: every pair of values of two factors appears in some case."""
    uncovered = {
        ((i, a), (j, b))
        for i, j in itertools.combinations(range(len(FACTORS)), 2)
        for a in FACTORS[i]
        for b in FACTORS[j]
    }
    cases: list[tuple] = []
    all_cases = list(itertools.product(*FACTORS))
    while uncovered:
        best = max(
            all_cases,
            key=lambda c: sum(((i, c[i]), (j, c[j])) in uncovered for i, j in itertools.combinations(range(len(c)), 2)),
        )
        cases.append(best)
        uncovered -= {((i, best[i]), (j, best[j])) for i, j in itertools.combinations(range(len(best)), 2)}
    return cases


def full_products() -> list[tuple]:
    return [
        (m, "l2", o, r, g, c) for m in MEMORIES for o in OPTIMIZERS for r in READS for g in GRADIENTS for c in CHUNKS
    ]


CASES = sorted(set(pairwise_cases()) | set(full_products()), key=str)
PRIME = 13


def compile_case(tmp_path: Path, case: tuple) -> torch.nn.Module:
    memory, objective, optimizer, read, gradient, chunk = case
    text = TEMPLATE.format(
        memory=memory if memory == "matrix" else "mlp(depth = 2, expand = 2, residual)",
        objective=objective,
        optimizer=optimizer_text(optimizer),
        read=read,
        gradient=gradient,
        chunk=chunk,
    )
    spec = tmp_path / "case.nest"
    spec.write_text(text)
    torch.manual_seed(0)
    return nestc.compile(spec).double()


def test_the_covering_set_covers_every_pair() -> None:
    cases = pairwise_cases()
    for i, j in itertools.combinations(range(len(FACTORS)), 2):
        for a in FACTORS[i]:
            for b in FACTORS[j]:
                assert any(c[i] == a and c[j] == b for c in cases), (i, a, j, b)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace(" ", "") for x in c))
def test_chunked_equals_reference(tmp_path: Path, case: tuple) -> None:
    model = compile_case(tmp_path, case)
    chunk = case[-1]
    for length in sorted({max(1, chunk - 1), chunk + 1, PRIME}):
        tokens = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(length))
        weights = torch.randn(2, length, 257, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        results = {}
        for backend in ("chunked", "reference"):
            model.backend = backend
            logits = model(tokens)
            grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()), allow_unused=True)
            results[backend] = (logits.detach(), grads)
        torch.testing.assert_close(results["chunked"][0], results["reference"][0], rtol=1e-9, atol=1e-10)
        for (name, param), a, b in zip(model.named_parameters(), results["chunked"][1], results["reference"][1]):
            a = torch.zeros_like(param) if a is None else a  # unused on one side: a zero gradient
            b = torch.zeros_like(param) if b is None else b
            scale = b.abs().max().clamp(min=1e-12)
            assert float((a - b).abs().max() / scale) < 1e-7, f"{name} at T={length}"

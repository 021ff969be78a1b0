"""The whole compiled model: the chunked backend against the reference interpreter (DESIGN §3).

Both backends share one set of parameters (`model.backend` switches between them), so every comparison
below runs the same module twice: logits and the gradient of every parameter must agree. Also: exact
streaming, packed documents (end-of-document token and `doc_start`), and the scheduler's window.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import Tensor

import nestc_runtime
from nestc.pipeline import front_end, to_plan
from nestc_runtime import CompiledModel, ModelState
from nestc_runtime.plan import Plan

SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
SPECS = ("linear_attention", "deltanet", "gated_deltanet")
GRADS = ("through", "stop", "truncate2")
BACKENDS = ("reference", "chunked")
EOD = 256
VOCAB = 257
BATCH = 2
F64 = torch.float64
TOL64 = 1e-9  # both sides in float64
TOL32 = 1e-5  # DESIGN §3 fp32 tolerance: RMSE(out - ref) / RMS(ref)


# ---- helpers


@cache
def _base_plan(spec: str) -> Plan:
    return to_plan(front_end(SPECS_DIR / f"{spec}.nest", {"d": 16, "heads": 2, "layers": 2}))


def make_plan(spec: str, chunk: int = 1, read: str = "online", grad: str = "through") -> Plan:
    plan = copy.deepcopy(_base_plan(spec))
    level = plan.levels["memory"]
    level.chunk = chunk
    level.read = read
    if grad.startswith("truncate"):
        level.gradient, level.truncate_k = "truncate", int(grad.removeprefix("truncate"))
    else:
        level.gradient = grad
    return plan


def make_model(
    spec: str, chunk: int = 1, read: str = "online", grad: str = "through", dtype: torch.dtype = F64, seed: int = 0
) -> CompiledModel:
    torch.manual_seed(seed)
    model = nestc_runtime.build(make_plan(spec, chunk, read, grad), "reference")
    return model.to(dtype)


def random_tokens(batch: int, length: int, seed: int) -> Tensor:
    """Ordinary tokens (never the end-of-document id): one document per row."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, EOD, (batch, length), generator=gen)


def weights_like(logits: Tensor, seed: int = 1234) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(logits.shape, generator=gen, dtype=torch.float64).to(logits.dtype)


def rel_err(a: Tensor, b: Tensor) -> float:
    """RMSE(a - b) / RMS(b); absolute RMSE where b is all zeros."""
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).pow(2).mean().sqrt().item()
    scale = b.pow(2).mean().sqrt().item()
    return diff / scale if scale > 0 else diff


def assert_close(a: Tensor, b: Tensor, tol: float, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def param_grads(model: CompiledModel, loss: Tensor) -> dict[str, Tensor]:
    """The gradient of every parameter (zeros where the loss does not reach it)."""
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads, strict=True)}


def run_with_grads(model: CompiledModel, backend: str, tokens: Tensor, **kw: object) -> tuple[Tensor, dict]:
    model.backend = backend
    logits = model(tokens, **kw)
    loss = (logits * weights_like(logits)).sum()
    return logits.detach(), param_grads(model, loss)


def assert_grads_close(got: dict[str, Tensor], ref: dict[str, Tensor], tol: float) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        assert_close(got[name], ref[name], tol, f"grad {name}")


def assert_states_close(got: ModelState, ref: ModelState, tol: float) -> None:
    assert got.memories.keys() == ref.memories.keys()
    assert torch.equal(got.last_was_eod, ref.last_was_eod)
    for name, level_a in got.memories.items():
        a, b = level_a.op, ref.memories[name].op
        for field in ("S", "P", "log_decay"):
            assert_close(getattr(a, field), getattr(b, field), tol, f"{name}.{field}")
        assert torch.equal(a.phase, b.phase), f"{name}.phase {a.phase} != {b.phase}"
        assert torch.equal(a.chunks_done, b.chunks_done), f"{name}.chunks_done {a.chunks_done} != {b.chunks_done}"


def memory_param_names(model: CompiledModel, role: str) -> list[str]:
    """Parameters of one role (`keys`, `queries`, ...) in every memory layer."""
    key = {"queries": "query", "keys": "key", "values": "value"}[role]
    return [n for n, _ in model.named_parameters() if f".exprs.{key}.proj." in n]


# ---- chunked == reference over the whole model


def _equivalence_cases() -> list[tuple[str, str, int, int]]:
    cases = []
    for spec in SPECS:
        for grad in GRADS:
            cases += [(spec, grad, 1, 63), (spec, grad, 1, 65)]
            for chunk in (4, 16):
                cases += [(spec, grad, chunk, length) for length in (chunk - 1, chunk + 1, 37)]
    cases += [("deltanet", grad, 1, 131) for grad in GRADS]
    return cases


@pytest.mark.parametrize(("spec", "grad", "chunk", "length"), _equivalence_cases())
def test_chunked_equals_reference(spec: str, grad: str, chunk: int, length: int) -> None:
    model = make_model(spec, chunk=chunk, grad=grad)
    tokens = random_tokens(BATCH, length, seed=length + 7 * chunk)
    ref_logits, ref_grads = run_with_grads(model, "reference", tokens)
    logits, grads = run_with_grads(model, "chunked", tokens)
    assert ref_logits.shape == (BATCH, length, VOCAB)
    assert_close(logits, ref_logits, TOL64, "logits")
    assert_grads_close(grads, ref_grads, TOL64)
    # The memory's input projections get gradient exactly when it flows through the updates.
    keys = memory_param_names(model, "keys")
    assert len(keys) == 2
    for name in keys + memory_param_names(model, "queries"):
        if grad == "stop" and ".exprs.key." in name:
            assert ref_grads[name].abs().max() == 0 and grads[name].abs().max() == 0, name
        else:
            assert ref_grads[name].abs().max() > 0, f"{name} has no gradient under {grad}"


@pytest.mark.parametrize("grad", ("through", "truncate2"))
@pytest.mark.parametrize("read", ("before", "boundary"))
@pytest.mark.parametrize("spec", SPECS)
def test_chunked_equals_reference_reads(spec: str, read: str, grad: str) -> None:
    model = make_model(spec, chunk=4, read=read, grad=grad)
    tokens = random_tokens(BATCH, 37, seed=11)
    ref_logits, ref_grads = run_with_grads(model, "reference", tokens)
    logits, grads = run_with_grads(model, "chunked", tokens)
    assert_close(logits, ref_logits, TOL64, "logits")
    assert_grads_close(grads, ref_grads, TOL64)


@pytest.mark.parametrize(("chunk", "length"), ((1, 65), (16, 37)))
@pytest.mark.parametrize("spec", SPECS)
def test_chunked_equals_reference_fp32(spec: str, chunk: int, length: int) -> None:
    model = make_model(spec, chunk=chunk, dtype=torch.float32)
    tokens = random_tokens(BATCH, length, seed=3)
    ref_logits, ref_grads = run_with_grads(model, "reference", tokens)
    logits, grads = run_with_grads(model, "chunked", tokens)
    assert logits.dtype == torch.float32
    assert_close(logits, ref_logits, TOL32, "logits")
    assert_grads_close(grads, ref_grads, TOL32)


@pytest.mark.parametrize("spec", SPECS)
def test_chunked_equals_reference_with_documents(spec: str) -> None:
    """Random end-of-document tokens at different places per row, chunk 4, truncated gradient."""
    model = make_model(spec, chunk=4, grad="truncate2")
    tokens = random_tokens(3, 41, seed=5)
    tokens[0, [6, 7, 30]] = EOD  # includes a one-token document
    tokens[1, 17] = EOD
    tokens[2, 40] = EOD  # the last token: nothing follows
    ref_logits, ref_grads = run_with_grads(model, "reference", tokens)
    logits, grads = run_with_grads(model, "chunked", tokens)
    assert_close(logits, ref_logits, TOL64, "logits")
    assert_grads_close(grads, ref_grads, TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_comparisons_are_sensitive(backend: str) -> None:
    """Chunk size, read and gradient mode each change the model: the tolerances above can catch a mix-up."""
    tokens = random_tokens(BATCH, 37, seed=2)

    def logits_and_grads(**kw: object) -> tuple[Tensor, dict]:
        return run_with_grads(make_model("gated_deltanet", **kw), backend, tokens)

    base, base_grads = logits_and_grads()
    for kw in ({"chunk": 4}, {"read": "before"}, {"chunk": 4, "read": "boundary"}):
        assert rel_err(logits_and_grads(**kw)[0], base) > 1e-3, kw
    for grad in ("stop", "truncate2"):
        grads = logits_and_grads(grad=grad)[1]
        assert max(rel_err(grads[n], base_grads[n]) for n in grads) > 1e-3, grad


# ---- streaming


PIECES = ((0, 5), (5, 21), (21, 48))


def _stream(model: CompiledModel, tokens: Tensor) -> tuple[Tensor, ModelState]:
    state = model.init_state(tokens.shape[0])
    outputs = []
    for start, stop in PIECES:
        logits, state = model(tokens[:, start:stop], state, final=stop == tokens.shape[1])
        outputs.append(logits)
    return torch.cat(outputs, 1), state


def _grads_of(model: CompiledModel, logits: Tensor) -> dict[str, Tensor]:
    return param_grads(model, (logits * weights_like(logits)).sum())


@pytest.mark.parametrize("eod", (False, True), ids=("one-doc", "eod"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("spec", "chunk"), (("linear_attention", 4), ("deltanet", 1), ("deltanet", 16), ("gated_deltanet", 4))
)
def test_streaming_in_pieces_equals_one_call(spec: str, chunk: int, backend: str, eod: bool) -> None:
    model = make_model(spec, chunk=chunk, grad="truncate2")
    tokens = random_tokens(BATCH, 48, seed=17)
    if eod:
        tokens[0, 20] = EOD  # the last token of the middle piece: the next call starts a document
        tokens[1, 30] = EOD  # inside the last piece
    model.backend = backend
    whole, whole_state = model(tokens, model.init_state(BATCH), final=True)
    whole_grads = _grads_of(model, whole)
    streamed, state = _stream(model, tokens)
    streamed_grads = _grads_of(model, streamed)

    assert_close(streamed, whole, TOL64, "streamed logits")
    assert_states_close(state, whole_state, TOL64)
    assert_grads_close(streamed_grads, whole_grads, TOL64)
    last_doc = torch.tensor([27, 17] if eod else [48, 48])  # each row's tokens since its last document start
    for memory in state.memories.values():
        assert torch.equal(memory.op.phase, last_doc % chunk)
        assert torch.equal(memory.op.chunks_done, last_doc // chunk)
        assert torch.equal(memory.position, last_doc)
    # A stateless call is the same whole sequence, and the reference agrees with the streamed result.
    assert_close(model(tokens), whole, TOL64, "stateless call")
    model.backend = "reference"
    assert_close(streamed, model(tokens), TOL64, "streamed vs reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_start_on_a_streamed_call_resets(backend: str) -> None:
    model = make_model("gated_deltanet", chunk=4)
    model.backend = backend
    first, second = random_tokens(BATCH, 10, seed=1), random_tokens(BATCH, 13, seed=2)
    _, state = model(first, model.init_state(BATCH))
    mask = torch.zeros_like(second, dtype=torch.bool)
    mask[0, 0] = True  # row 0 starts a new document, row 1 continues its stream
    logits, _ = model(second, state, doc_start=mask)
    assert_close(logits[0], model(second[:1])[0], TOL64, "reset row")
    continued = model(torch.cat([first, second], 1)[1:])[0, first.shape[1] :]
    assert_close(logits[1], continued, TOL64, "continued row")
    assert rel_err(logits[1], model(second[1:])[0]) > 1e-3  # the carried state matters


# ---- packed documents


# Per row, the lengths of its documents (every row 37 tokens long, boundaries at different places).
ROWS = ((20, 17), (9, 11, 17), (1, 36))


def _documents(use_eod: bool) -> list[list[Tensor]]:
    docs = []
    for r, lengths in enumerate(ROWS):
        row = []
        for i, n in enumerate(lengths):
            doc = random_tokens(1, n, seed=100 * r + i)[0]
            if use_eod and i < len(lengths) - 1:
                doc[-1] = EOD  # a document ends with its end-of-document token
            row.append(doc)
        docs.append(row)
    return docs


@pytest.mark.parametrize("how", ("eod", "doc_start"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("spec", "chunk", "grad"),
    (
        ("linear_attention", 4, "through"),
        ("deltanet", 1, "through"),
        ("deltanet", 4, "truncate2"),
        ("gated_deltanet", 4, "stop"),
        ("gated_deltanet", 1, "truncate2"),
    ),
)
def test_packed_documents_equal_documents_alone(spec: str, chunk: int, grad: str, backend: str, how: str) -> None:
    model = make_model(spec, chunk=chunk, grad=grad)
    model.backend = backend
    docs = _documents(use_eod=how == "eod")
    tokens = torch.stack([torch.cat(row) for row in docs])
    doc_start = None
    if how == "doc_start":
        doc_start = torch.zeros_like(tokens, dtype=torch.bool)
        for r, lengths in enumerate(ROWS):
            for s in torch.tensor(lengths).cumsum(0)[:-1].tolist():
                doc_start[r, s] = True
        assert not (tokens == EOD).any()
    packed = model(tokens, doc_start=doc_start)
    weights = weights_like(packed)
    packed_grads = param_grads(model, (packed * weights).sum())

    alone_loss = torch.zeros((), dtype=F64)
    for r, row in enumerate(docs):
        start = 0
        for doc in row:
            alone = model(doc[None])[0]
            stop = start + doc.numel()
            assert_close(packed[r, start:stop], alone, TOL64, f"row {r} document at {start}")
            alone_loss = alone_loss + (alone * weights[r, start:stop]).sum()
            start = stop
    assert_grads_close(param_grads(model, alone_loss), packed_grads, TOL64)
    # Without the boundaries the rows compute something else.
    assert rel_err(model(torch.where(tokens == EOD, 0, tokens)), packed) > 1e-3


# ---- the scheduler's window


@pytest.mark.parametrize(
    ("spec", "chunk", "grad"),
    (
        ("linear_attention", 4, "truncate2"),
        ("deltanet", 1, "through"),
        ("deltanet", 5, "truncate2"),
        ("gated_deltanet", 16, "through"),
        ("gated_deltanet", 5, "stop"),
    ),
)
def test_window_equals_whole_call(spec: str, chunk: int, grad: str) -> None:
    model = make_model(spec, chunk=chunk, grad=grad)
    tokens = random_tokens(BATCH, 45, seed=9)
    tokens[1, 12] = EOD
    tokens[1, 33] = EOD

    def run(window: int | None, stream: bool = False) -> tuple[Tensor, dict, ModelState | None]:
        model.plan.window = window
        if stream:
            logits, state = model(tokens, model.init_state(BATCH), final=True)
        else:
            logits, state = model(tokens), None
        return logits, _grads_of(model, logits), state

    model.backend = "chunked"
    assert model.plan.window is None
    whole, whole_grads, _ = run(None)
    windowed, windowed_grads, _ = run(16)
    assert_close(windowed, whole, TOL64, "windowed logits")
    assert_grads_close(windowed_grads, whole_grads, TOL64)
    _, _, whole_state = run(None, stream=True)
    _, _, windowed_state = run(16, stream=True)
    assert whole_state is not None and windowed_state is not None
    assert_states_close(windowed_state, whole_state, TOL64)
    model.plan.window = None
    model.backend = "reference"
    assert_close(windowed, model(tokens), TOL64, "windowed vs reference")


def test_windows_follow_the_chunks_not_the_call_length() -> None:
    """The scheduler's windows are as long as the chunks allow, whatever the call's length: a repacked batch of
    documents 7 tokens long ran 1-token windows when the length entered the gcd (gcd(7, 2) = 1), 4x the
    work and memory of HOPE on a batch with one document boundary per row."""
    spec = Path(__file__).parents[1] / "specs" / "hope.nest"
    params = {"d": 16.0, "heads": 2.0, "layers": 1.0, "c_other": 2.0, "c_mem": 4.0, "chunks": [2.0, 4.0]}
    model = nestc_runtime.build(to_plan(front_end(spec, params)))
    mem = model.init_state(2).memories
    assert model._window_bounds(7, mem) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert model._window_bounds(1, mem) == [(0, 1)]

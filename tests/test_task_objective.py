"""`objective task` (CMS, DESIGN §3) against the worked example written out in plain torch, chunked against
the reference interpreter, streaming with a pending label, and updates exactly at chunk ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import nestc

SPEC = """
system cms_only(d = 8, vocab = 257, chunk = 2, lr = 0.5) {
  level pretrain { update every step; optimizer adamw(lr = 1e-3) }
  level cms in pretrain {
    memory    mlp(depth = 2, expand = 2, residual)
    objective task
    optimizer gd(lr = lr)
    update every chunk tokens; read boundary; outer gradient stop
  }
  model = embed -> residual(cms) -> head
}
"""


def build(tmp_path: Path, backend: str, **params: float) -> torch.nn.Module:
    spec = tmp_path / "cms.nest"
    spec.write_text(SPEC)
    torch.manual_seed(0)
    return nestc.compile(spec, backend=backend, **params).double()


def written_out(model: torch.nn.Module, tokens: Tensor, lr: float, chunk: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """DESIGN §3's worked example in plain torch: logits of a chunk use θ at its start; at the chunk end
    θ ← θ − ∇ Σ η CE(logits_t, x_{t+1}) over the chunk's labelled tokens; the last chunk is flushed."""
    params = dict(model.named_parameters())
    embed = params["layers.0.weight"]
    head = params["layers.2.proj.weight"]
    init1 = next(p for n, p in params.items() if n.endswith("init1"))[0].detach()
    init2 = next(p for n, p in params.items() if n.endswith("init2"))[0].detach()

    def logits_at(theta: tuple[Tensor, Tensor], t: int) -> Tensor:
        h = embed[tokens[0, t]]
        w1, w2 = theta
        mlp = h + w1 @ F.silu(w2 @ h)
        return head @ (h + mlp)

    theta = (init1.clone().requires_grad_(True), init2.clone().requires_grad_(True))
    outs = []
    length = tokens.shape[1]
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        chunk_logits = [logits_at(theta, t) for t in range(start, stop)]
        outs.extend(chunk_logits)
        terms = [
            lr * F.cross_entropy(chunk_logits[i][None], tokens[0, t + 1][None])
            for i, t in enumerate(range(start, stop))
            if t + 1 < length
        ]
        if terms:
            grads = torch.autograd.grad(sum(terms), theta)
            theta = tuple((p - g).detach().requires_grad_(True) for p, g in zip(theta, grads))  # type: ignore[assignment]
    return torch.stack(outs)[None], (theta[0].detach(), theta[1].detach())


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("length", [4, 5, 7])
def test_task_level_follows_the_worked_example(tmp_path: Path, backend: str, length: int) -> None:
    model = build(tmp_path, backend)
    tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
    expected, theta = written_out(model, tokens, lr=0.5, chunk=2)
    state = model.init_state(1)
    logits, state = model(tokens, state, final=True)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    op = state.memories["cms"].op
    torch.testing.assert_close(op.W1[0, 0], theta[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(op.W2[0, 0], theta[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunked_equals_reference_with_gradients(tmp_path: Path, chunk: int) -> None:
    model = build(tmp_path, "chunked", chunk=chunk)
    tokens = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(chunk))
    tokens[1, 4] = 256  # a packed second document in row 1
    weights = torch.randn(3, 11, 257, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out = {}
    for backend in ("chunked", "reference"):
        model.backend = backend
        logits = model(tokens)
        grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
        out[backend] = (logits.detach(), grads)
    torch.testing.assert_close(out["chunked"][0], out["reference"][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(out["chunked"][1], out["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_streaming_with_a_pending_label_equals_one_call(tmp_path: Path, backend: str) -> None:
    model = build(tmp_path, backend, chunk=4)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    whole, whole_state = model(tokens, model.init_state(2), final=True)
    state = model.init_state(2)
    pieces = []
    for start, stop in ((0, 4), (4, 5), (5, 12)):  # the first piece ends exactly at a chunk end
        out, state = model(tokens[:, start:stop], state, final=stop == 12)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-9, atol=1e-9)
    a, b = state.memories["cms"].op, whole_state.memories["cms"].op
    torch.testing.assert_close(a.W1, b.W1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.W2, b.W2, rtol=1e-9, atol=1e-9)


def test_weights_change_exactly_at_chunk_ends(tmp_path: Path) -> None:
    model = build(tmp_path, "chunked", chunk=3)
    tokens = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    state = model.init_state(1)
    previous = state.memories["cms"].op.W1.clone()
    for t in range(10):
        _, state = model(tokens[:, t : t + 1], state)
        now = state.memories["cms"].op.W1
        # The update of the chunk ending at token t waits for x_{t+1}: it lands with the next call.
        changed = not torch.equal(now, previous)
        assert changed == (t >= 3 and t % 3 == 0), f"token {t}: changed={changed}"
        previous = now.clone()


def test_streaming_under_no_grad_equals_one_call(tmp_path: Path) -> None:
    """Generation runs without grad; a task level still needs the graph of its chunk, across calls too."""
    model = build(tmp_path, "chunked", chunk=4)
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    whole, _ = model(tokens, model.init_state(1), final=True)
    pieces = []
    with torch.no_grad():
        state = model.init_state(1)
        for t in range(9):
            out, state = model(tokens[:, t : t + 1], state, final=t == 8)
            pieces.append(out)
    assert not pieces[-1].requires_grad
    torch.testing.assert_close(torch.cat(pieces, 1), whole.detach(), rtol=1e-9, atol=1e-9)


def test_chunk_reads_sit_after_the_window_input_in_the_graph(tmp_path: Path) -> None:
    """The chunk-end pass differentiates the outputs of the reads of θ. autograd walks every node reachable
    from the loss unless those inputs sit deep in the graph (it prunes nodes of a lower topological number),
    so a read whose graph began at a plain leaf would make each pass walk the whole call so far: O(T²) per
    call. Each read's graph starts at its window's input instead."""
    model = build(tmp_path, "chunked", chunk=4)
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    _, state = model(tokens, model.init_state(1))
    records = state.memories["cms"].op.reads
    assert records
    for record in records:
        read = record.output
        assert read.grad_fn is not None, "a plain leaf: chunk-end passes walk the whole graph"
        inputs = [node for node, _ in read.grad_fn.next_functions if node is not None]
        assert any(type(node).__name__ != "AccumulateGrad" for node in inputs)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_the_written_out_read_backward_equals_autograd(act: str, norm: bool) -> None:
    """The read's backward (to x and to the initial state, summed over rows) and the chunk's θ gradient are
    written out; autograd through M_θ(x) with θ = θ_rows + (θ_{-1} − sg(θ_{-1})) is the oracle."""
    from nestc_runtime.levels.task import _MemoryRead
    from nestc_runtime.ops.mlp_memory import MLPMemoryConfig
    from nestc_runtime.ops.mlp_memory.state import apply_memory, apply_memory_backward

    gen = torch.Generator().manual_seed(7)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    config = MLPMemoryConfig(norm=norm, activation=act)
    x = rand(3, 2, 5, 4).requires_grad_(True)
    init1, init2 = rand(2, 4, 8).requires_grad_(True), rand(2, 8, 4).requires_grad_(True)
    rows1, rows2 = rand(3, 2, 4, 8), rand(3, 2, 8, 4)  # per-row states, no graph
    d_out = rand(3, 2, 5, 4)

    out = _MemoryRead.apply(x, rows1, rows2, init1, init2, config)
    got = torch.autograd.grad(out, (x, init1, init2), d_out)
    W1 = rows1 + (init1 - init1.detach())
    W2 = rows2 + (init2 - init2.detach())
    expected_out = apply_memory(W1, W2, x, config)
    want = torch.autograd.grad(expected_out, (x, init1, init2), d_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "init1", "init2"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)

    theta = (rows1.clone().requires_grad_(True), rows2.clone().requires_grad_(True))
    want_theta = torch.autograd.grad(apply_memory(*theta, x.detach(), config), theta, d_out)
    _, delta, s, u = apply_memory_backward(rows1, rows2, x.detach(), d_out, config)
    torch.testing.assert_close(delta.transpose(-1, -2) @ s, want_theta[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u.transpose(-1, -2) @ x.detach(), want_theta[1], rtol=1e-10, atol=1e-12)

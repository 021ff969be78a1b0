"""Beyond the papers of the issue: TTT-Linear, TTT-MLP and the Atlas-style Omega rule, each against its own
equation written out here, chunked against the reference, streaming against one call; and the two generic
primitives they brought to the catalogue: an MLP memory of depth 1 (a matrix memory with an output map
[x +] [LN](W x)) and an objective summed over a sliding window of keys and values (`window = c`).

The written-out forwards use plain torch and `torch.func.grad` of the written-out inner loss (the runtime
derives its gradients by hand); the shared pieces (embeddings, pre-norm blocks, SwiGLU, heads, the MLP
memory, conventions of the parameterisation) come from test_architectures.
"""

from __future__ import annotations

import json
import math
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_architectures import (
    EOD,
    SIZES,
    causal_conv,
    inner_grad,
    l2n,
    layer_norm,
    merge,
    mlp,
    projection,
    rel_err,
    rows,
    split,
    stacked,
    tokens_for,
)
from torch import Tensor

import nestc
import nestc_runtime
from nestc.cli import main
from nestc.pipeline import front_end, to_plan
from nestc_runtime.ops import matrix_memory as mm
from nestc_runtime.ops import mlp_memory as mlpm
from nestc_runtime.ops.memory_maps import run_memory, windows

ROOT = Path(__file__).resolve().parents[1]
SPECS_DIR = ROOT / "specs"
# Larger inner rates than the shipped defaults so that in-context updates matter at these sizes.
SMALL: dict[str, dict[str, float]] = {
    "ttt_linear": {"chunk": 4, "eta": 0.5},
    "ttt_mlp": {"chunk": 4, "eta": 0.5},
    "atlas": {"chunk": 4, "c": 3, "eta": 0.5},
}
SPECS = tuple(SMALL)


def compiled(spec: str, backend: str = "chunked", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return nestc.compile(SPECS_DIR / f"{spec}.nest", backend=backend, **{**SIZES, **SMALL[spec]}).double()


# ------------------------------------------------------------------------------------------------------
# The equations, written out
# ------------------------------------------------------------------------------------------------------


def ttt_linear(x: Tensor, p: dict[str, Tensor], pre: str, layer: int) -> Tensor:
    """TTT-Linear (Sun et al. 2024 §2): f(x) = x + LN(W x); per mini-batch of b = 4 tokens every gradient of
    ℓ = ½‖f(θ_K x_s) − θ_V x_s‖² at the mini-batch start W_{t'}; W_t = W_{t'} − Σ_{s≤t} η_s ∇ℓ(W_{t'}; x_s);
    z_t = f(θ_Q x_t; W_t); η_t = 0.5 σ(θ_lr x_t) per head; W_0 learned."""
    q, k, v = (split(x @ projection(p, pre, r).T) for r in ("query", "key", "value"))
    eta = 0.5 * torch.sigmoid(x @ p[f"{pre}.rates.lr.proj.lr_0.weight"].T).transpose(1, 2)

    def f(W: Tensor, z: Tensor) -> Tensor:
        return z + layer_norm((W @ z[..., None])[..., 0])

    W = rows(p[f"{pre}.init"], x.shape[0])
    out = []
    for t in range(x.shape[1]):
        if t % 4 == 0:
            P = W
        k_t, v_t = k[:, :, t], v[:, :, t]
        g = torch.func.grad(lambda A, k_t=k_t, v_t=v_t: 0.5 * (f(A, k_t) - v_t).pow(2).sum())(P)
        W = W - eta[:, :, t, None, None] * g
        out.append(f(W, q[:, :, t]))
    return merge(torch.stack(out, 2))


def gelu_mlp(W1: Tensor, W2: Tensor, x: Tensor) -> Tensor:
    """f(x) = x + LN(W1 GELU(W2 x)), GELU in its erf form; W1 (..., d, h), W2 (..., h, d), x (..., d)."""
    z = (W1 @ F.gelu(W2 @ x[..., None]))[..., 0]
    return x + layer_norm(z)


def ttt_mlp(x: Tensor, p: dict[str, Tensor], pre: str, layer: int) -> Tensor:
    """TTT-MLP: as TTT-Linear with f(x) = x + LN(W1 GELU(W2 x)), hidden 4×."""
    q, k, v = (split(x @ projection(p, pre, r).T) for r in ("query", "key", "value"))
    eta = 0.5 * torch.sigmoid(x @ p[f"{pre}.rates.lr.proj.lr_0.weight"].T).transpose(1, 2)
    W1, W2 = rows(p[f"{pre}.init1"], x.shape[0]), rows(p[f"{pre}.init2"], x.shape[0])

    def loss(a: Tensor, b: Tensor, k_t: Tensor, v_t: Tensor) -> Tensor:
        return 0.5 * (gelu_mlp(a, b, k_t) - v_t).pow(2).sum()

    out = []
    for t in range(x.shape[1]):
        if t % 4 == 0:
            P1, P2 = W1, W2
        g1, g2 = torch.func.grad(loss, argnums=(0, 1))(P1, P2, k[:, :, t], v[:, :, t])
        e = eta[:, :, t, None, None]
        W1, W2 = W1 - e * g1, W2 - e * g2
        out.append(gelu_mlp(W1, W2, q[:, :, t]))
    return merge(torch.stack(out, 2))


def omega(x: Tensor, p: dict[str, Tensor], pre: str, layer: int) -> Tensor:
    """Atlas's Omega rule (Eq. 9) with gd: ℓ_t = Σ_{i=t−2}^{t} ½‖M(k_i) − v_i‖² (c = 3, i ≥ 0), every gradient
    of a chunk of 4 at its start state; M_t = α_t M_{t−1} − η_t ∇ℓ_t; o_t = M_t(q_t); M(x) = x + W1 σ(W2 x);
    q, k, v = SiLU(conv4(x W)), q and k l2-normalised; η = 0.5 σ(x W_η), α = σ(x W_α + 4) per head."""

    def proj(role: str, conv: str) -> Tensor:
        e = f"{pre}.exprs.{role}"
        y = causal_conv(x @ projection(p, pre, role).T, p[f"{e}.convs.{conv}.weight"], p[f"{e}.convs.{conv}.bias"])
        return split(F.silu(y))

    q, k, v = l2n(proj("query", "e_a_a")), l2n(proj("key", "e_a_a")), proj("value", "e_a")
    eta = 0.5 * torch.sigmoid(x @ p[f"{pre}.rates.lr.proj.lr_0.weight"].T).transpose(1, 2)
    alpha = torch.sigmoid(x @ p[f"{pre}.rates.retain.proj.retain_0.weight"].T + 4).transpose(1, 2)
    W1, W2 = rows(p[f"{pre}.init1"], x.shape[0]), rows(p[f"{pre}.init2"], x.shape[0])
    out = []
    for t in range(x.shape[1]):
        if t % 4 == 0:
            P1, P2 = W1, W2
        terms = [inner_grad(P1, P2, k[:, :, i], v[:, :, i]) for i in range(max(0, t - 2), t + 1)]
        g1, g2 = sum(g[0] for g in terms), sum(g[1] for g in terms)
        e, a = eta[:, :, t, None, None], alpha[:, :, t, None, None]
        W1, W2 = a * W1 - e * g1, a * W2 - e * g2
        out.append(mlp(W1, W2, q[:, :, t]))
    return merge(torch.stack(out, 2))


WRITTEN_OUT = {"ttt_linear": ttt_linear, "ttt_mlp": ttt_mlp, "atlas": omega}


def zero_lr_model(spec: str, trained: torch.nn.Module) -> torch.nn.Module:
    """The same system with its inner learning rate the constant 0, carrying the trained weights."""
    plan = to_plan(front_end(SPECS_DIR / f"{spec}.nest", {**SIZES, **SMALL[spec]}))
    for level in plan.levels.values():
        if "lr" in level.rates:
            level.rates["lr"].expr = {"op": "const", "value": 0.0}
    model = nestc_runtime.build(plan).double()
    model.load_state_dict(trained.state_dict(), strict=False)
    return model


# ------------------------------------------------------------------------------------------------------
# 1. Each spec against its equation; chunked equals reference; streaming equals one call
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("spec", SPECS)
def test_output_equals_the_written_out_forward(spec: str, backend: str) -> None:
    model = compiled(spec, backend)
    tokens = tokens_for(2, 11, seed=1)  # chunks of 4 with a partial last one; windows past the chunk start
    expected = stacked(model, tokens, [WRITTEN_OUT[spec]])
    err = rel_err(model(tokens).detach(), expected.detach())
    assert err < 1e-9, f"{spec} ({backend}): relative error {err:.2e}"
    # The in-context updates matter on these inputs: without them the output differs.
    assert rel_err(zero_lr_model(spec, model)(tokens).detach(), expected.detach()) > 1e-4


@pytest.mark.parametrize("length", [5, 13])
@pytest.mark.parametrize("spec", SPECS)
def test_chunked_equals_reference_with_gradients(spec: str, length: int) -> None:
    model = compiled(spec, seed=length)
    tokens = tokens_for(2, length, seed=length)
    if length > 8:
        tokens[1, 6] = EOD  # a packed second document: its window and state start afresh
    weights = torch.randn(2, length, 257, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out = {}
    for backend in ("chunked", "reference"):
        model.backend = backend
        logits = model(tokens)
        out[backend] = (logits.detach(), torch.autograd.grad((logits * weights).sum(), list(model.parameters())))
    assert rel_err(out["chunked"][0], out["reference"][0]) < 1e-10
    for (name, _), a, b in zip(model.named_parameters(), out["chunked"][1], out["reference"][1]):
        assert b.abs().max() > 0, name  # every parameter is trained through the in-context updates
        assert rel_err(a, b) < 1e-8, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("spec", SPECS)
def test_streaming_token_by_token_equals_one_call(spec: str) -> None:
    model = compiled(spec, seed=3)
    tokens = tokens_for(2, 13, seed=4)
    whole, _ = model(tokens, model.init_state(2), final=True)
    state, pieces = model.init_state(2), []
    for t in range(13):
        out, state = model(tokens[:, t : t + 1], state, final=t == 12)
        pieces.append(out)
    assert rel_err(torch.cat(pieces, 1).detach(), whole.detach()) < 1e-10


# ------------------------------------------------------------------------------------------------------
# 2. The primitives at the op level, on fresh random inputs, forward and backward
# ------------------------------------------------------------------------------------------------------


def _inputs(seed: int, steps: int, window: int, per_channel: bool, dk: int = 4) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    batch, heads = 2, 2
    x = {
        "queries": rand(batch, heads, steps, dk),
        "keys": F.normalize(rand(batch, heads, steps, dk), dim=-1),
        "values": rand(batch, heads, steps, dk),
        "lr": 0.3 * torch.sigmoid(rand(batch, heads, steps)),
        "retain": torch.sigmoid(rand(batch, heads, steps, *((dk,) if per_channel else ())) + 3),
        "momentum": torch.sigmoid(rand(batch, heads, steps)),
    }
    return {k: v.requires_grad_() for k, v in x.items()}


def _stacked(x: dict[str, Tensor], window: int, lengths: Tensor | None) -> dict[str, Tensor]:
    if window == 1:
        return dict(x)
    out = dict(x)
    for role in ("keys", "values"):
        history = x[role].new_zeros(*x[role].shape[:2], window - 1, x[role].shape[-1])
        out[role] = windows(x[role], history, lengths)[0]
    return out


def _matrix_state(batch: int, init: Tensor) -> mm.MatrixMemoryState:
    return mm.MatrixMemoryState.initial(init, batch)


# (residual, norm, objective, optimizer, read, grad, chunk, decay, per_channel): pairs of the new options with
# the catalogue's; dgd and momentum_gd take the scan fallback of the chunked path.
MAPPED = [
    (True, True, "l2", "gd", "online", "through", 4, "after", False),
    (True, False, "l2", "gd", "before", "stop", 1, "before", True),
    (False, True, "huber", "gd", "boundary", "truncate", 4, "after", True),
    (True, True, "dot", "momentum_gd", "online", "stop", 4, "after", False),
    (True, True, "l2", "dgd", "boundary", "through", 1, "after", True),
    (False, True, "lp", "gd", "online", "through", 1, "before", False),
]


@pytest.mark.parametrize("case", MAPPED, ids=[f"{c[2]}-{c[3]}-{c[4]}-{c[5]}-C{c[6]}" for c in MAPPED])
def test_output_map_chunked_equals_reference(case: tuple) -> None:
    residual, norm, objective, optimizer, read, grad, chunk, decay, per_channel = case
    cfg = mm.MatrixMemoryConfig(
        objective=objective, decay=decay, chunk=chunk, read=read, grad=grad, truncate_k=2, optimizer=optimizer,
        p=3.0, delta=0.5, residual=residual, norm=norm,
    )  # fmt: skip
    x = _inputs(seed=chunk, steps=11, window=1, per_channel=per_channel)
    init = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    lengths = torch.tensor([11, 7])
    results = []
    for reference in (True, False):
        o, state = run_memory(mm.scan, mm.chunked, x, _matrix_state(2, init), cfg, lengths, reference)
        loss = (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() + state.S.pow(2).sum()
        grads = torch.autograd.grad(loss, [init, *x.values()], allow_unused=True)
        results.append((o.detach(), state.S.detach(), grads))
    (o_ref, s_ref, g_ref), (o_fast, s_fast, g_fast) = results
    assert rel_err(o_fast, o_ref) < 1e-10 and rel_err(s_fast, s_ref) < 1e-10
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if b is not None and b.abs().max() > 0:
            assert rel_err(a, b) < 1e-9


def test_output_map_reference_is_the_equation() -> None:
    """M(x) = x + LN(S x), gd with decay after, chunk 2, read before: S_t = α S_{t−1} − η ∇½‖M_P(k) − v‖²."""
    cfg = mm.MatrixMemoryConfig(objective="l2", decay="after", chunk=2, read="before", residual=True, norm=True)
    x = {k: v.detach() for k, v in _inputs(seed=3, steps=7, window=1, per_channel=False).items()}
    init = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    o, _ = mm.scan(x["queries"], x["keys"], x["values"], x["lr"], x["retain"], _matrix_state(2, init), cfg)

    def f(S: Tensor, z: Tensor) -> Tensor:
        return z + layer_norm((S @ z[..., None])[..., 0])

    S = rows(init, 2)
    for t in range(7):
        if t % 2 == 0:
            P = S
        k, v = x["keys"][:, :, t], x["values"][:, :, t]
        g = torch.func.grad(lambda A, k=k, v=v: 0.5 * (f(A, k) - v).pow(2).sum())(P)
        assert rel_err(o[:, :, t], f(S, x["queries"][:, :, t])) < 1e-12
        S = x["retain"][:, :, t, None, None] * S - x["lr"][:, :, t, None, None] * g


# (memory, objective, optimizer, read, grad, chunk, decay, per_channel)
WINDOWED = [
    ("matrix", "l2", "gd", "online", "through", 4, "after", False),
    ("matrix", "l2", "gd", "before", "truncate", 1, "before", True),
    ("matrix", "huber", "gd", "boundary", "stop", 4, "before", False),
    ("matrix", "l2", "momentum_gd", "online", "through", 2, "after", True),
    ("mlp", "l2", "gd", "online", "through", 4, "after", True),
    ("mlp", "dot", "gd", "before", "stop", 2, "after", False),
    ("mlp", "l2", "gd", "boundary", "truncate", 4, "after", False),
    ("mlp", "l2", "momentum_gd", "online", "through", 4, "after", False),
]


def _op(memory: str, cfg_fields: dict, init_seed: int) -> tuple:
    g = torch.Generator().manual_seed(init_seed)
    if memory == "matrix":
        init = (0.3 * torch.randn(2, 4, 4, dtype=torch.float64, generator=g)).requires_grad_()
        return mm.scan, mm.chunked, mm.MatrixMemoryConfig(**cfg_fields), (init,), lambda: _matrix_state(2, init)
    fields = {k: v for k, v in cfg_fields.items() if k != "decay"}
    init1 = (0.3 * torch.randn(2, 4, 8, dtype=torch.float64, generator=g)).requires_grad_()
    init2 = (0.5 * torch.randn(2, 8, 4, dtype=torch.float64, generator=g)).requires_grad_()
    return (
        mlpm.scan,
        mlpm.chunked,
        mlpm.MLPMemoryConfig(**fields),
        (init1, init2),
        lambda: mlpm.MLPMemoryState.initial(init1, init2, 2),
    )


@pytest.mark.parametrize("case", WINDOWED, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}-C{c[5]}" for c in WINDOWED])
def test_windowed_objective_chunked_equals_reference(case: tuple) -> None:
    """The virtual-token form (gd) or the scan fallback against the per-token oracle, with padding, a
    window longer than a chunk, and the outputs and gradients of everything."""
    memory, objective, optimizer, read, grad, chunk, decay, per_channel = case
    fields = dict(objective=objective, decay=decay, chunk=chunk, read=read, grad=grad, truncate_k=2)
    fields |= dict(optimizer=optimizer, window=3 if chunk > 1 else 5)
    scan, fast, cfg, inits, initial = _op(memory, fields, init_seed=chunk)
    x = _inputs(seed=10 + chunk, steps=13, window=cfg.window, per_channel=per_channel)
    lengths = torch.tensor([13, 8])
    results = []
    for reference in (True, False):
        o, state = run_memory(scan, fast, _stacked(x, cfg.window, lengths), initial(), cfg, lengths, reference)
        final = state.S if memory == "matrix" else state.W1
        loss = (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() + final.pow(2).sum()
        grads = torch.autograd.grad(loss, [*inits, *x.values()], allow_unused=True)
        results.append((o.detach(), final.detach(), state.phase, grads))
    (o_ref, s_ref, ph_ref, g_ref), (o_fast, s_fast, ph_fast, g_fast) = results
    assert rel_err(o_fast, o_ref) < 1e-10 and rel_err(s_fast, s_ref) < 1e-10
    assert torch.equal(ph_fast, ph_ref) and torch.equal(ph_ref, torch.tensor([13, 8]) % chunk)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if b is not None and b.abs().max() > 0:
            assert rel_err(a, b) < 1e-9


def test_windowed_objective_is_the_omega_rule() -> None:
    """Matrix memory, l2, gd, chunk 2, c = 3, read online, per-channel α:
    S_t = S_{t−1}·diag(α_t) − η_t Σ_{i=max(0, t−2)}^{t} (P k_i − v_i) k_iᵀ, P the chunk-start state."""
    cfg = mm.MatrixMemoryConfig(objective="l2", decay="after", chunk=2, read="online", window=3)
    x = {k: v.detach() for k, v in _inputs(seed=5, steps=9, window=3, per_channel=True).items()}
    init = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    st = _stacked(x, 3, None)
    o, _ = mm.scan(st["queries"], st["keys"], st["values"], st["lr"], st["retain"], _matrix_state(2, init), cfg)
    S = rows(init, 2)
    for t in range(9):
        if t % 2 == 0:
            P = S
        g = sum(
            (P @ x["keys"][:, :, i, :, None] - x["values"][:, :, i, :, None]) * x["keys"][:, :, i, None, :]
            for i in range(max(0, t - 2), t + 1)
        )
        S = S * x["retain"][:, :, t, None, :] - x["lr"][:, :, t, None, None] * g
        assert rel_err(o[:, :, t], (S @ x["queries"][:, :, t, :, None])[..., 0]) < 1e-12


def test_window_history_streams_exactly() -> None:
    """The stacks of a call in three pieces, carrying the history, equal the stacks of one call."""
    x = torch.randn(2, 2, 10, 3, dtype=torch.float64)
    whole, _ = windows(x, x.new_zeros(2, 2, 3, 3), None)
    history, pieces = x.new_zeros(2, 2, 3, 3), []
    for a, b in ((0, 4), (4, 5), (5, 10)):
        stack, history = windows(x[:, :, a:b], history, None)
        pieces.append(stack)
    assert torch.equal(torch.cat(pieces, 2), whole)
    assert torch.equal(whole[:, :, 1, :2], torch.zeros(2, 2, 2, 3)) and torch.equal(whole[:, :, 1, 2:], x[:, :, :2])
    _, short = windows(x, x.new_zeros(2, 2, 3, 3), torch.tensor([10, 2]))  # padding after 2 tokens in row 1
    assert torch.equal(short[1, :, 1:], x[1, :, :2]) and torch.equal(short[0], x[0, :, 7:])


def test_windowed_mlp_config_refuses_dgd() -> None:
    with pytest.raises(ValueError, match="windowed"):
        mlpm.MLPMemoryConfig(optimizer="dgd", window=2)
    with pytest.raises(ValueError, match="window"):
        replace(mm.MatrixMemoryConfig(objective="l2", decay="after", chunk=1, read="online"), window=0)


# ------------------------------------------------------------------------------------------------------
# 3. The language: checks, E040, `nestc show`, parameter counts
# ------------------------------------------------------------------------------------------------------


def _spec(tmp_path: Path, memory: str, objective: str, optimizer: str = "gd(lr = 0.1)") -> Path:
    path = tmp_path / "s.nest"
    path.write_text(
        "system s(d = 16, heads = 2, vocab = 257) {\n"
        "  level train { update every step; optimizer adamw(lr = 1e-3) }\n"
        "  level m in train {\n"
        f"    memory    {memory} per head\n"
        "    queries   linear(x)\n"
        "    keys      linear(x) |> l2norm\n"
        "    values    linear(x)\n"
        f"    objective {objective}\n"
        f"    optimizer {optimizer}\n"
        "    update every 4 tokens; read online\n"
        "  }\n"
        "  model = embed -> m -> head\n"
        "}\n"
    )
    return path


def test_window_must_be_a_positive_integer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(tmp_path, "matrix", "l2(m(keys), values, window = 0)")
    assert main(["check", str(spec)]) == 1
    assert "error[E016]" in capsys.readouterr().err


def test_windowed_dgd_is_valid_but_not_runnable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(tmp_path, "matrix", "l2(m(keys), values, window = 3)", "dgd(lr = 0.1)")
    assert main(["check", str(spec)]) == 0
    assert main(["compile", str(spec), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{spec}:8:5: error[E040]:" in err and "windowed objective with `dgd`" in err


def test_windowed_momentum_warns_that_it_runs_as_a_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    optimizer = "momentum_gd(lr = 0.1, momentum = 0.9)"
    spec = _spec(tmp_path, "mlp(depth = 2, expand = 4, residual)", "l2(m(keys), values, window = 3)", optimizer)
    assert main(["check", str(spec)]) == 0
    assert "warning[W003]" in capsys.readouterr().err


@pytest.mark.parametrize("memory", ["mlp(depth = 1)", "mlp(depth = 1, residual, norm = layernorm)"])
def test_depth_one_memory_counts_and_runs(tmp_path: Path, memory: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(tmp_path, memory, "l2(m(keys), values, window = 2)")
    assert main(["show", str(spec), "--format", "json"]) == 0
    rows_ = json.loads(capsys.readouterr().out)
    rows_ = rows_["levels"] if isinstance(rows_, dict) else rows_
    (level,) = [r for r in rows_ if r["instance"] == "m"]
    assert "depth 1" in level["memory"] and "window 2" in level["objective"]
    model = nestc.compile(spec)
    own = sum(p.numel() for n, p in model.named_parameters() if ".exprs." in n or n.endswith(".init"))
    assert own == level["params"]
    assert model(tokens_for(1, 6, seed=0)).isfinite().all()


@pytest.mark.parametrize("spec", SPECS)
def test_shipped_spec_shows_its_levels(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(SPECS_DIR / f"{spec}.nest")]) == 0
    out = capsys.readouterr().out
    assert "memory[0]" in out and "memory[1]" in out and "every 16 tokens" in out and "pretrain" in out


# ------------------------------------------------------------------------------------------------------
# 4. Each spec trains briefly on the CPU (the protocol: 2 layers, d = 64, T = 64, batch 4, 30 steps)
# ------------------------------------------------------------------------------------------------------

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "json"


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_thirty_steps_lower_the_loss(spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["train", str(SPECS_DIR / f"{spec}.nest"), "--data", str(CORPUS), "--steps", "30", "--out", str(out)]
    args += ["--batch", "4", "--seq-len", "64", "--no-progress", "--format", "json", "--set", "d=64"]
    args += ["--set", "layers=2", "--set", "train.log_every=1"]
    began = time.perf_counter()
    assert main(args) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{spec}: 30 steps in {time.perf_counter() - began:.1f} s, loss {first:.3f} -> {last:.3f}")
    assert len(losses) == 30 and math.isfinite(last) and last < first - 0.1, (first, last)

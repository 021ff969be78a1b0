"""The objective and inner-optimizer catalogue (DESIGN §5): `lp`, `huber`, `newton_schulz`, `delta_momentum`.

Every expectation is written out here in plain torch (nothing of the runtime is used to compute it):
the token gradient g_t is autograd of the loss as printed, taken at the chunk's linearisation point
(DESIGN §3), and the optimizer recurrences are typed in from DESIGN §5:

    lp(p):     ℓ = (1/p) Σ_i |r_i|^p,   r = M(k) − v        (gradient sign(r)|r|^{p−1} ∂M/∂θ)
    huber(δ):  ℓ = Σ_i ½r_i² (|r_i| ≤ δ), δ(|r_i| − ½δ) beyond  (gradient clamp(r, −δ, δ) ∂M/∂θ)
    newton_schulz(steps):  m ← β m + g;  M ← α M − η NS_steps(m)
    delta_momentum(λ):     m ← m(α I − λ ĝᵀĝ) − η g;  M ← M + m;  ĝ = g / (‖g‖_F + ε),  ε = 1e-8

Then the chunked runtime is held to the reference (outputs and gradients of every input and of the
initial states) at C ∈ {1, 4}, T ∈ {C − 1, C + 1, 13}, in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from nestc_runtime.ops import matrix_memory as mat
from nestc_runtime.ops import mlp_memory as mlp
from nestc_runtime.ops.matrix_memory.chunked import has_parallel_form as matrix_parallel
from nestc_runtime.ops.mlp_memory import has_parallel_form as mlp_parallel

F64 = torch.float64
B, H, DK, DV, HID = 2, 2, 5, 4, 6
EPS = 1e-8  # delta_momentum's ε: the one the runtime uses (DELTA_MOMENTUM_EPS)
NS_ABC = (3.4445, -4.7750, 2.0315)


# ---- plain-torch equations


def loss(r: Tensor, objective: str, p: float, delta: float) -> Tensor:
    """ℓ summed over rows and heads, as printed."""
    if objective == "l2":
        return 0.5 * r.pow(2).sum()
    if objective == "lp":
        return r.abs().pow(p).sum() / p
    quad = 0.5 * r.pow(2)
    lin = delta * (r.abs() - 0.5 * delta)
    return torch.where(r.abs() <= delta, quad, lin).sum()


def ns_by_hand(X: Tensor, steps: int) -> Tensor:
    a, b, c = NS_ABC
    out = torch.empty_like(X)
    for idx in itertools.product(*(range(n) for n in X.shape[:-2])):
        Y = X[idx] / (torch.linalg.norm(X[idx]) + 1e-7)
        tall = Y.shape[0] > Y.shape[1]
        if tall:
            Y = Y.T
        for _ in range(steps):
            A = Y @ Y.T
            Y = a * Y + b * A @ Y + c * A @ A @ Y
        out[idx] = Y.T if tall else Y
    return out


def optimizer_by_hand(
    name: str, W: Tensor, m: Tensor, g: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor, steps: int, lam: float
) -> tuple[Tensor, Tensor]:
    """One step of DESIGN §5 on (W, m) with per-(row, head) scalar rates (B,H,1,1)."""
    if name == "gd":
        return alpha * W - eta * g, m
    if name == "momentum_gd":
        m = beta * m - eta * g
        return alpha * W + m, m
    if name == "newton_schulz":
        m = beta * m + g
        return alpha * W - eta * ns_by_hand(m, steps), m
    assert name == "delta_momentum"
    norm = torch.linalg.matrix_norm(g)[..., None, None]
    g_hat = g / (norm + EPS)
    eye = torch.eye(g.shape[-1], dtype=g.dtype)
    m = m @ (alpha * eye - lam * g_hat.transpose(-1, -2) @ g_hat) - eta * g
    return W + m, m


def matrix_by_hand(xs: dict[str, Tensor], cfg: dict, chunk: int) -> tuple[Tensor, Tensor]:
    """Matrix memory, read online, decay after: outputs (B,H,T,dv) and the final state."""
    q, k, v, lr, retain, beta, init = (xs[n].detach() for n in ("q", "k", "v", "lr", "retain", "beta", "init"))
    steps = q.shape[2]
    S = init.expand(B, H, DV, DK).clone()
    m = torch.zeros_like(S)
    outs = []
    for b in range(0, steps, chunk):
        base = S.clone()
        for t in range(b, min(b + chunk, steps)):
            lin = base.clone().requires_grad_()
            r = (lin @ k[:, :, t, :, None])[..., 0] - v[:, :, t]
            (g,) = torch.autograd.grad(loss(r, cfg["objective"], cfg["p"], cfg["delta"]), lin)
            rate = [x[:, :, t, None, None] for x in (lr, retain, beta)]
            S, m = optimizer_by_hand(cfg["optimizer"], S, m, g, *rate, cfg["steps"], cfg["lam"])
            outs.append((S @ q[:, :, t, :, None])[..., 0])
    return torch.stack(outs, 2), S


def mlp_apply(W1: Tensor, W2: Tensor, x: Tensor) -> Tensor:
    """M(x) = x + W1 silu(W2 x) for x (B,H,d)."""
    hidden = torch.nn.functional.silu((W2 @ x[..., None])[..., 0])
    return x + (W1 @ hidden[..., None])[..., 0]


def mlp_by_hand(xs: dict[str, Tensor], cfg: dict, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """MLP memory x + W1 σ(W2 x), read online: outputs and the final (W1, W2); optimizers per weight matrix."""
    q, k, v, lr, retain, beta = (xs[n].detach() for n in ("q", "k", "v", "lr", "retain", "beta"))
    W1 = xs["init1"].detach().expand(B, H, DK, HID).clone()
    W2 = xs["init2"].detach().expand(B, H, HID, DK).clone()
    m1, m2 = torch.zeros_like(W1), torch.zeros_like(W2)
    outs = []
    for b in range(0, q.shape[2], chunk):
        base1, base2 = W1.clone(), W2.clone()
        for t in range(b, min(b + chunk, q.shape[2])):
            P1, P2 = base1.clone().requires_grad_(), base2.clone().requires_grad_()
            r = mlp_apply(P1, P2, k[:, :, t]) - v[:, :, t]
            g1, g2 = torch.autograd.grad(loss(r, cfg["objective"], cfg["p"], cfg["delta"]), (P1, P2))
            rate = [x[:, :, t, None, None] for x in (lr, retain, beta)]
            W1, m1 = optimizer_by_hand(cfg["optimizer"], W1, m1, g1, *rate, cfg["steps"], cfg["lam"])
            W2, m2 = optimizer_by_hand(cfg["optimizer"], W2, m2, g2, *rate, cfg["steps"], cfg["lam"])
            outs.append(mlp_apply(W1, W2, q[:, :, t]))
    return torch.stack(outs, 2), W1, W2


# ---- inputs and calls


def make(steps: int, seed: int, mlp_memory: bool = False) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    dv = DK if mlp_memory else DV
    xs = {
        "q": rand(B, H, steps, DK),
        "k": torch.nn.functional.normalize(rand(B, H, steps, DK), dim=-1),
        "v": rand(B, H, steps, dv),
        "lr": (0.1 if mlp_memory else 0.5) * torch.sigmoid(rand(B, H, steps)),
        "retain": 0.5 + 0.5 * torch.sigmoid(rand(B, H, steps) + 1.0),
        "beta": 0.9 * torch.sigmoid(rand(B, H, steps)),
    }
    if mlp_memory:
        xs["init1"] = 0.3 * rand(H, DK, HID)
        xs["init2"] = rand(H, HID, DK) / DK**0.5
    else:
        xs["init"] = 0.3 * rand(H, DV, DK)
    return {name: x.requires_grad_() for name, x in xs.items()}


def settings(objective: str, optimizer: str, p: float = 3.0, delta: float = 0.3) -> dict:
    return {"objective": objective, "optimizer": optimizer, "p": p, "delta": delta, "steps": 3, "lam": 0.7}


def matrix_cfg(s: dict, chunk: int, decay: str = "after", read: str = "online", grad: str = "through"):  # type: ignore[no-untyped-def]
    return mat.MatrixMemoryConfig(decay=decay, chunk=chunk, read=read, grad=grad, **s)


def mlp_cfg(s: dict, chunk: int, read: str = "online", grad: str = "through"):  # type: ignore[no-untyped-def]
    return mlp.MLPMemoryConfig(chunk=chunk, read=read, grad=grad, **s)


def run_matrix(fn: Callable, xs: dict[str, Tensor], cfg, **kw):  # type: ignore[no-untyped-def]
    state = kw.pop("state", None) or mat.MatrixMemoryState.initial(xs["init"], xs["q"].shape[0])
    beta = xs["beta"] if cfg.optimizer in ("momentum_gd", "newton_schulz") else None
    return fn(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg, momentum=beta, **kw)


def run_mlp(fn: Callable, xs: dict[str, Tensor], cfg, **kw):  # type: ignore[no-untyped-def]
    state = kw.pop("state", None) or mlp.MLPMemoryState.initial(xs["init1"], xs["init2"], xs["q"].shape[0])
    beta = xs["beta"] if cfg.optimizer in ("momentum_gd", "newton_schulz") else None
    return fn(xs["q"], xs["k"], xs["v"], xs["lr"], xs["retain"], state, cfg, momentum=beta, **kw)


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    scale = b.pow(2).mean().sqrt().clamp_min(1e-12) if b.numel() else torch.tensor(1.0)
    err = ((a - b).pow(2).mean().sqrt() / scale).item() if b.numel() else 0.0
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def grads(total: Tensor, xs: dict[str, Tensor]) -> dict[str, Tensor]:
    names = list(xs)
    found = torch.autograd.grad(total, [xs[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(xs[n]) if g is None else g for n, g in zip(names, found)}


def weighted(out: Tensor, finals: tuple[Tensor, ...], seed: int = 7) -> Tensor:
    """A loss that touches every output and every final state entry with random weights."""
    gen = torch.Generator().manual_seed(seed)
    total = (out * torch.randn(out.shape, generator=gen, dtype=F64)).sum()
    for x in finals:
        total = total + (x * torch.randn(x.shape, generator=gen, dtype=F64)).sum()
    return total


MATRIX_OPT = ("gd", "momentum_gd", "newton_schulz", "delta_momentum")
MLP_OPT = ("gd", "momentum_gd", "newton_schulz", "delta_momentum")


# ---- against the equations


@pytest.mark.parametrize("objective", ["lp", "huber"])
@pytest.mark.parametrize("optimizer", MATRIX_OPT)
@pytest.mark.parametrize("chunk", [1, 4])
def test_matrix_by_hand(objective: str, optimizer: str, chunk: int) -> None:
    xs = make(11, seed=1)
    s = settings(objective, optimizer)
    want_o, want_S = matrix_by_hand(xs, s, chunk)
    for fn in (mat.scan, mat.chunked):
        o, state = run_matrix(fn, xs, matrix_cfg(s, chunk))
        assert_close(o, want_o)
        assert_close(state.S, want_S)


@pytest.mark.parametrize("objective", ["lp", "huber"])
@pytest.mark.parametrize("optimizer", MLP_OPT)
@pytest.mark.parametrize("chunk", [1, 4])
def test_mlp_by_hand(objective: str, optimizer: str, chunk: int) -> None:
    xs = make(9, seed=2, mlp_memory=True)
    s = settings(objective, optimizer)
    want_o, want_W1, want_W2 = mlp_by_hand(xs, s, chunk)
    for fn in (mlp.scan, mlp.chunked):
        o, state = run_mlp(fn, xs, mlp_cfg(s, chunk))
        assert_close(o, want_o)
        assert_close(state.W1, want_W1)
        assert_close(state.W2, want_W2)


def test_lp_gradient_convention() -> None:
    """g = sign(r)|r|^{p−1} kᵀ for the matrix memory (one token from S = 0: r = −v)."""
    xs = make(1, seed=3)
    with torch.no_grad():
        xs["init"].zero_()
    cfg = matrix_cfg(settings("lp", "gd", p=3.0), 1)
    _, state = run_matrix(mat.scan, xs, cfg)
    r = -xs["v"][:, :, 0].detach()
    g = (r.sign() * r.abs().pow(2))[..., :, None] * xs["k"][:, :, 0, None, :].detach()
    want = -xs["lr"][:, :, 0, None, None].detach() * g  # α · 0 − η g
    assert_close(state.S, want, 1e-12)


@pytest.mark.parametrize("backend", ["scan", "chunked"])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("limit", ["lp2", "huber_inf"])
def test_l2_limits(backend: str, chunk: int, limit: str) -> None:
    """lp with p = 2 and huber with a huge δ are l2, for both memories (outputs and gradients)."""
    s = settings("lp", "gd", p=2.0) if limit == "lp2" else settings("huber", "gd", delta=1e9)
    l2 = {**s, "objective": "l2"}
    xs = make(10, seed=4)
    fn_mat = getattr(mat, backend)
    o, st = run_matrix(fn_mat, xs, matrix_cfg(s, chunk, decay="before"))
    o2, st2 = run_matrix(fn_mat, xs, matrix_cfg(l2, chunk, decay="before"))
    assert_close(o, o2, 1e-13)
    g, g2 = grads(weighted(o, (st.S,)), xs), grads(weighted(o2, (st2.S,)), xs)
    for name in xs:
        assert_close(g[name], g2[name], 1e-12)
    ys = make(10, seed=5, mlp_memory=True)
    fn_mlp = getattr(mlp, backend)
    o, st = run_mlp(fn_mlp, ys, mlp_cfg({**s, "optimizer": "momentum_gd"}, chunk))
    o2, st2 = run_mlp(fn_mlp, ys, mlp_cfg({**l2, "optimizer": "momentum_gd"}, chunk))
    assert_close(o, o2, 1e-13)
    g, g2 = grads(weighted(o, (st.W1, st.W2)), ys), grads(weighted(o2, (st2.W1, st2.W2)), ys)
    for name in ys:
        assert_close(g[name], g2[name], 1e-12)


def test_huber_is_quadratic_inside_linear_outside() -> None:
    """One token from S = 0 (r = −v): the step is clamp(r, −δ, δ) kᵀ, so large residuals move it by δ."""
    xs = make(1, seed=6)
    with torch.no_grad():
        xs["init"].zero_()
        xs["v"].mul_(3.0)
    _, state = run_matrix(mat.scan, xs, matrix_cfg(settings("huber", "gd", delta=0.5), 1))
    r = -xs["v"][:, :, 0].detach()
    want = -xs["lr"][:, :, 0, None, None].detach() * r.clamp(-0.5, 0.5)[..., None] * xs["k"][:, :, 0, None, :]
    assert_close(state.S, want.detach(), 1e-12)


# ---- chunked == reference


def _lengths_for(steps: int) -> Tensor | None:
    return torch.tensor([steps, max(steps - 2, 0)]) if steps > 2 else None


MATRIX_CASES = [
    ("lp", "gd", "after", "online"),
    ("huber", "gd", "before", "online"),
    ("lp", "gd", "before", "before"),
    ("huber", "gd", "after", "boundary"),
    ("lp", "newton_schulz", "before", "online"),
    ("huber", "delta_momentum", "after", "online"),
    ("l2", "newton_schulz", "after", "boundary"),
    ("dot", "delta_momentum", "after", "before"),
]


@pytest.mark.parametrize("case", MATRIX_CASES, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("which", ["C-1", "C+1", "13"])
def test_matrix_chunked_equals_reference(case: tuple[str, str, str, str], chunk: int, which: str) -> None:
    objective, optimizer, decay, read = case
    steps = {"C-1": chunk - 1, "C+1": chunk + 1, "13": 13}[which]
    xs = make(steps, seed=10 + steps)
    cfg = matrix_cfg(settings(objective, optimizer), chunk, decay=decay, read=read)
    lengths = _lengths_for(steps)
    assert matrix_parallel(cfg, xs["retain"], mat.MatrixMemoryState.initial(xs["init"], B)) == (optimizer == "gd")
    o_ref, s_ref = run_matrix(mat.scan, xs, cfg, lengths=lengths)
    o_chk, s_chk = run_matrix(mat.chunked, xs, cfg, lengths=lengths, block=4)
    assert_close(o_chk, o_ref)
    for name in ("S", "P", "momentum"):
        assert_close(getattr(s_chk, name), getattr(s_ref, name))
    g_ref = grads(weighted(o_ref, (s_ref.S, s_ref.P)), xs)
    g_chk = grads(weighted(o_chk, (s_chk.S, s_chk.P)), xs)
    for name in xs:
        assert_close(g_chk[name], g_ref[name])


MLP_CASES = [
    ("lp", "gd", "online"),
    ("huber", "momentum_gd", "before"),
    ("huber", "gd", "boundary"),
    ("lp", "newton_schulz", "online"),
    ("huber", "delta_momentum", "online"),
    ("l2", "delta_momentum", "boundary"),
]


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("which", ["C-1", "C+1", "13"])
def test_mlp_chunked_equals_reference(case: tuple[str, str, str], chunk: int, which: str) -> None:
    objective, optimizer, read = case
    steps = {"C-1": chunk - 1, "C+1": chunk + 1, "13": 13}[which]
    xs = make(steps, seed=20 + steps, mlp_memory=True)
    cfg = mlp_cfg(settings(objective, optimizer), chunk, read=read)
    lengths = _lengths_for(steps)
    beta = xs["beta"] if optimizer in ("momentum_gd", "newton_schulz") else None
    assert mlp_parallel(cfg, xs["retain"], beta) == (optimizer in ("gd", "momentum_gd") and chunk > 1)
    o_ref, s_ref = run_mlp(mlp.scan, xs, cfg, lengths=lengths)
    o_chk, s_chk = run_mlp(mlp.chunked, xs, cfg, lengths=lengths)
    assert_close(o_chk, o_ref)
    for name in ("W1", "W2", "P1", "P2", "M1", "M2"):
        assert_close(getattr(s_chk, name), getattr(s_ref, name))
    g_ref = grads(weighted(o_ref, (s_ref.W1, s_ref.W2)), xs)
    g_chk = grads(weighted(o_chk, (s_chk.W1, s_chk.W2)), xs)
    for name in xs:
        assert_close(g_chk[name], g_ref[name])


@pytest.mark.parametrize("objective", ["lp", "huber"])
@pytest.mark.parametrize("decay", ["after", "before"])
@pytest.mark.parametrize("grad", ["through", "stop", "truncate"])
def test_matrix_streaming_nonlinear_objectives(objective: str, decay: str, grad: str) -> None:
    """Pieces 6 + 7 of a 13-token stream (C = 4: the second call continues a carried chunk, whose
    linearisation point is the carried P) give the reference's one-call outputs, state and gradients."""
    xs = make(13, seed=30)
    cfg = mat.MatrixMemoryConfig(
        decay=decay, chunk=4, read="online", grad=grad, truncate_k=1, **settings(objective, "gd")
    )
    o_ref, s_ref = run_matrix(mat.scan, xs, cfg)
    first = {n: (x[:, :, :6] if x.dim() >= 3 and n != "init" else x) for n, x in xs.items()}
    second = {n: (x[:, :, 6:] if x.dim() >= 3 and n != "init" else x) for n, x in xs.items()}
    o1, mid = run_matrix(mat.chunked, first, cfg, block=4)
    o2, s_chk = run_matrix(mat.chunked, second, cfg, state=mid, block=4)
    o_chk = torch.cat([o1, o2], 2)
    assert_close(o_chk, o_ref)
    assert_close(s_chk.S, s_ref.S)
    g_ref = grads(weighted(o_ref, (s_ref.S,)), xs)
    g_chk = grads(weighted(o_chk, (s_chk.S,)), xs)
    for name in xs:
        assert_close(g_chk[name], g_ref[name])


def test_config_rejects_bad_numbers() -> None:
    with pytest.raises(ValueError):
        mat.MatrixMemoryConfig(objective="lp", decay="after", chunk=1, read="online", p=0.5)
    with pytest.raises(ValueError):
        mlp.MLPMemoryConfig(objective="huber", delta=0.0)
    with pytest.raises(ValueError):
        mat.MatrixMemoryConfig(
            objective="l2", decay="after", chunk=1, read="online", optimizer="newton_schulz", steps=-1
        )
    with pytest.raises(ValueError):
        mat.MatrixMemoryConfig(objective="l2", decay="before", chunk=1, read="online", optimizer="delta_momentum")

"""The shipped architectures against their papers' equations, chunked against the reference interpreter,
streaming against one call, in-context learning, and HOPE's continuum memory at its chunk ends.

Equation tests build the expectation here, in plain torch, from the model's own parameters (read by name
from `named_parameters()`) and nothing of the runtime: embeddings → per block (pre-norm RMSNorm, the mixer
of the spec, linear out, residual) → RMSNorm → head. Conventions taken from the parameterisation, not the
maths: heads are contiguous slices of the model channels, a conv weight's column j multiplies the input j
tokens back, RMSNorm's eps is 1e-6, the memories' parameter-free LayerNorm eps is 1e-5, l2norm's floor 1e-6.
Every inner gradient is taken here with `torch.func.grad` of the written-out loss (the runtime derives its
gradients by hand), so the derivative is independent too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import nestc
import nestc_runtime
from nestc.pipeline import front_end, to_plan

SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
EOD = 256
SMALL: dict[str, dict[str, float | list[int]]] = {
    "transformer": {},
    "titans_lmm": {"chunk": 4},
    "titans_mal": {"chunk": 4, "window": 8, "persistent": 2},
    "titans_mag": {"chunk": 4, "window": 8, "persistent": 2},
    "titans_selfmod": {"c_other": 2, "c_mem": 4, "eta_max": 0.1},
    "hope": {"c_other": 2, "c_mem": 4, "chunks": [2, 4], "cms_lr": 0.5, "eta_max": 0.1},
    "hope_attention": {"chunks": [2, 4], "cms_lr": 0.5},
    "titans_mac": {"chunk": 2, "segment": 4, "persistent": 2},
}
RUNNING = tuple(s for s in SMALL if s != "titans_mac")  # MAC: the in-context-learning test leaves it out
MAC = "titans_mac"
SIZES = {"d": 16, "heads": 2, "layers": 2}
HEADS = 2


def compiled(spec: str, backend: str = "chunked", seed: int = 0, **params: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return nestc.compile(SPECS_DIR / f"{spec}.nest", backend=backend, **{**SIZES, **SMALL[spec], **params}).double()


def tokens_for(batch: int, length: int, seed: int) -> Tensor:
    return torch.randint(0, EOD, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


# ------------------------------------------------------------------------------------------------------
# Plain-torch pieces (nothing of the runtime)
# ------------------------------------------------------------------------------------------------------


def rms(h: Tensor, w: Tensor) -> Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def l2n(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


PLURAL = {"query": "queries", "key": "keys", "value": "values"}


def projection(p: dict[str, Tensor], pre: str, role: str) -> Tensor:
    return p[f"{pre}.exprs.{role}.proj.{PLURAL[role]}_0.weight"]


def split(x: Tensor) -> Tensor:
    """(B, T, H·dh) -> (B, H, T, dh)."""
    return x.unflatten(-1, (HEADS, -1)).transpose(1, 2)


def merge(x: Tensor) -> Tensor:
    """(B, H, T, dh) -> (B, T, H·dh)."""
    return x.transpose(1, 2).flatten(-2)


def swiglu(x: Tensor, p: dict[str, Tensor], pre: str) -> Tensor:
    gate, up, down = (p[f"{pre}.{n}.weight"] for n in ("gate", "up", "down"))
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T


def rope(x: Tensor) -> Tensor:
    """RoFormer: adjacent pairs (x[2i], x[2i+1]) rotated by m·10000^(−2i/dh) at position m (from 0)."""
    dh, steps = x.shape[-1], x.shape[-2]
    freq = 10000.0 ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    angle = torch.arange(steps, dtype=torch.float64)[:, None] * freq  # (T, dh/2)
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def causal_conv(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Depthwise causal: y_t[c] = Σ_j w[c, j] x_{t−j}[c] + b[c], zeros before the document start."""
    out = b.expand_as(x).clone()
    for j in range(w.shape[1]):
        shifted = torch.cat([x.new_zeros(x.shape[0], j, x.shape[2]), x[:, : x.shape[1] - j]], 1)
        out = out + w[:, j] * shifted
    return out


class StepConv:
    """`causal_conv` one token at a time: y_t[c] = Σ_j w[c, j] x_{t−j}[c] + b[c], zeros before the start."""

    def __init__(self, w: Tensor, b: Tensor) -> None:
        self.w, self.b = w, b
        self.past: list[Tensor] = []  # past[j] = x_{t−j}

    def __call__(self, x_t: Tensor) -> Tensor:
        self.past = [x_t, *self.past][: self.w.shape[1]]
        return self.b + sum(self.w[:, j] * x for j, x in enumerate(self.past))


def step_conv(p: dict[str, Tensor], pre: str, role: str) -> StepConv:
    """The one convolution in the `role` expression of the level at `pre`."""
    found = [n[: -len(".weight")] for n in p if n.startswith(f"{pre}.exprs.{role}.convs.") and n.endswith(".weight")]
    assert len(found) == 1, (pre, role, found)
    return StepConv(p[f"{found[0]}.weight"], p[f"{found[0]}.bias"])


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int | None = None, persistent: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Causal softmax attention (B, H, T, dh), scores q·k/√dh; token t sees s ≤ t (and t − s < window);
    persistent (H, P, dh) keys and values are prepended, always visible."""
    steps = q.shape[2]
    t, s = torch.arange(steps)[:, None], torch.arange(steps)[None, :]
    visible = s <= t
    if window is not None:
        visible = visible & (t - s < window)
    if persistent is not None:
        pk, pv = (x.expand(q.shape[0], *x.shape) for x in persistent)
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        visible = torch.cat([torch.ones(steps, pk.shape[2], dtype=torch.bool), visible], 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v


def layer_norm(z: Tensor) -> Tensor:
    mean = z.mean(-1, keepdim=True)
    var = (z - mean).pow(2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-5)


def mlp(W1: Tensor, W2: Tensor, x: Tensor, norm: bool = False) -> Tensor:
    """M(x) = x + [LN](W1 σ(W2 x)), σ = SiLU; W1 (..., d, h), W2 (..., h, d), x (..., d)."""
    z = (W1 @ F.silu(W2 @ x[..., None]))[..., 0]
    return x + (layer_norm(z) if norm else z)


def inner_grad(W1: Tensor, W2: Tensor, k: Tensor, v: Tensor, norm: bool = False) -> tuple[Tensor, Tensor]:
    """∇ of ℓ = ½‖M(k) − v‖² with respect to (W1, W2) only (k, v constants in this derivative)."""

    def loss(a: Tensor, b: Tensor) -> Tensor:
        return 0.5 * (mlp(a, b, k, norm) - v).pow(2).sum()

    return torch.func.grad(loss, argnums=(0, 1))(W1, W2)


def rows(init: Tensor, batch: int) -> Tensor:
    return init.expand(batch, *init.shape)


# ------------------------------------------------------------------------------------------------------
# Mixers, written from the papers
# ------------------------------------------------------------------------------------------------------


def titans_inputs(x: Tensor, p: dict[str, Tensor], pre: str) -> tuple[Tensor, ...]:
    """Titans' q, k, v = SiLU(conv4(x W)), q, k l2-normalised per head (B, H, T, dh); η = 0.01σ(x W_η),
    β = σ(x W_β) per head (B, H, T); α = 1 − σ(x W_α − 8) per channel (B, H, T, dh)."""

    def proj(role: str, conv: str) -> Tensor:
        e = f"{pre}.exprs.{role}"
        y = causal_conv(x @ projection(p, pre, role).T, p[f"{e}.convs.{conv}.weight"], p[f"{e}.convs.{conv}.bias"])
        return split(F.silu(y))

    q, k, v = l2n(proj("query", "e_a_a")), l2n(proj("key", "e_a_a")), proj("value", "e_a")
    eta = 0.01 * torch.sigmoid(x @ p[f"{pre}.rates.lr.proj.lr_0.weight"].T).transpose(1, 2)
    beta = torch.sigmoid(x @ p[f"{pre}.rates.momentum.proj.momentum_0.weight"].T).transpose(1, 2)
    alpha = split(1 - torch.sigmoid(x @ p[f"{pre}.rates.retain.proj.retain_0.weight"].T - 8))
    return q, k, v, eta, beta, alpha


class TitansMemory:
    """Titans' neural memory (Eq. 12–14, 16), one token at a time, its state kept between calls: per chunk of
    C tokens every g_t = ∇ ½‖M(k_t) − v_t‖² at the chunk-start state, M(x) = x + LN(W1 σ(W2 x));
    S_t = β S_{t−1} − η g_t, M_t = α ⊙ M_{t−1} + S_t (W2·diag(α), diag(α)·W1); read online, o_t = M_t(q_t)."""

    def __init__(self, p: dict[str, Tensor], pre: str, batch: int, chunk: int) -> None:
        self.W1, self.W2 = rows(p[f"{pre}.init1"], batch), rows(p[f"{pre}.init2"], batch)
        self.S1, self.S2 = torch.zeros_like(self.W1), torch.zeros_like(self.W2)
        self.chunk, self.t = chunk, 0

    def step(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, beta: Tensor, alpha: Tensor) -> Tensor:
        """One token: q, k, v, α (B, H, dh), η, β (B, H) -> o_t (B, H, dh)."""
        if self.t % self.chunk == 0:
            self.P1, self.P2 = self.W1, self.W2
        g1, g2 = inner_grad(self.P1, self.P2, k, v, norm=True)
        e, b = eta[:, :, None, None], beta[:, :, None, None]
        self.S1, self.S2 = b * self.S1 - e * g1, b * self.S2 - e * g2
        self.W1 = alpha[..., :, None] * self.W1 + self.S1
        self.W2 = self.W2 * alpha[..., None, :] + self.S2
        self.t += 1
        return mlp(self.W1, self.W2, q, norm=True)


def titans_memory(x: Tensor, p: dict[str, Tensor], pre: str, chunk: int) -> Tensor:
    """The Titans memory over a whole sequence x (B, T, d) from its initial state."""
    q, k, v, eta, beta, alpha = titans_inputs(x, p, pre)
    memory = TitansMemory(p, pre, x.shape[0], chunk)
    out = [
        memory.step(q[:, :, t], k[:, :, t], v[:, :, t], eta[:, :, t], beta[:, :, t], alpha[:, :, t])
        for t in range(x.shape[1])
    ]
    return merge(torch.stack(out, 2))


def titans_mac(x: Tensor, p: dict[str, Tensor], pre: str, chunk: int, segment: int) -> Tensor:
    """Titans MAC (Eq. 21–25), segment by segment of S tokens, x (B, T, d) the block's normalised input:
    h_t = M*_{s0−1}(q_t), q_t = l2n(SiLU(conv4(x W_Q))) with the memory's query map, M* at the state
        before the segment (retrieval at the segment boundary, before the update);
    y_t = attention of x_t over [persistent ‖ h_s, x_s for s0 ≤ s ≤ t] (each retrieval before its token;
        per head, scores q·k/√dh, queries, keys and values linear maps of that stream);
    the memory then takes in the segment's y (its q, k, v, η, β, α from y; chunk C) and is read online:
    o_t = y_t ⊙ σ(W_g M_t(q_t(y)))  (the spec's `gate(memory)`)."""
    mem, att = f"{pre}.2.gate.0", f"{pre}.1.attention.0"
    batch, length = x.shape[:2]
    q_read = titans_inputs(x, p, mem)[0]
    memory = TitansMemory(p, mem, batch, chunk)
    persistent = (p[f"{att}.persistent_keys"], p[f"{att}.persistent_values"])
    ys: list[Tensor] = []
    outs: list[Tensor] = []
    for s0 in range(0, length, segment):
        seg = range(s0, min(s0 + segment, length))
        h = merge(torch.stack([mlp(memory.W1, memory.W2, q_read[:, :, t], norm=True) for t in seg], 2))
        stream = torch.stack([h, x[:, s0 : seg.stop]], 2).flatten(1, 2)  # h_s0, x_s0, h_s0+1, x_s0+1, ...
        qa, ka, va = (split(stream @ projection(p, att, r).T) for r in ("query", "key", "value"))
        ys.append(merge(softmax_attention(qa, ka, va, None, persistent))[:, 1::2])
        q, k, v, eta, beta, alpha = titans_inputs(torch.cat(ys, 1), p, mem)  # causal: earlier y unchanged
        outs += [
            memory.step(q[:, :, t], k[:, :, t], v[:, :, t], eta[:, :, t], beta[:, :, t], alpha[:, :, t]) for t in seg
        ]
    y = torch.cat(ys, 1)
    return y * torch.sigmoid(merge(torch.stack(outs, 2)) @ p[f"{pre}.2.proj.weight"].T)


def mac_model(model: torch.nn.Module, tokens: Tensor) -> Tensor:
    """embed → per layer residual(rmsnorm → MAC → linear), residual(rmsnorm → swiglu) → rmsnorm → head."""
    p = dict(model.named_parameters())
    h = p["layers.0.weight"][tokens]
    for layer in range(SIZES["layers"]):
        pre = f"layers.{1 + 2 * layer}.body"
        h = h + titans_mac(rms(h, p[f"{pre}.0.weight"]), p, pre, chunk=2, segment=4) @ p[f"{pre}.3.proj.weight"].T
        pre = f"layers.{2 + 2 * layer}.body"
        h = h + swiglu(rms(h, p[f"{pre}.0.weight"]), p, f"{pre}.1")
    last = 1 + 2 * SIZES["layers"]
    return rms(h, p[f"layers.{last}.weight"]) @ p[f"layers.{last + 1}.proj.weight"].T


def swa(x: Tensor, p: dict[str, Tensor], pre: str, window: int) -> Tensor:
    q, k, v = (split(x @ projection(p, pre, r).T) for r in ("query", "key", "value"))
    persistent = (p[f"{pre}.persistent_keys"], p[f"{pre}.persistent_values"])
    return merge(softmax_attention(q, k, v, window, persistent))


def attention(x: Tensor, p: dict[str, Tensor], pre: str) -> Tensor:
    q, k, v = (split(x @ projection(p, pre, r).T) for r in ("query", "key", "value"))
    return merge(softmax_attention(rope(q), rope(k), v))


class SelfModifying:
    """Self-modifying Titans (NL Eq. 83–94), one token at a time, written out: five residual MLP memories
    M(x) = x + W1 σ(W2 x) per head. At token t (each memory's chunk restarting every C_□ tokens), with
    conv_□ a depthwise causal conv(4) of level □'s own (StepConv) over the generated sequence:
      k_□,t = l2norm(conv_□(M_k,b(x))_t), v_□,t = conv_□(M_v,b(x))_t, η_t = η_max σ(mean M_η,b(x_t)),
      α_t = σ(mean M_α,b(x_t))
    with M_□,b at its own chunk-start state; q_t = l2norm(conv(x W_q)_t); o_t = M_memory,t−1(q_t) (read
    before); then every memory takes a DGD step on v̂_□,t = l2norm(M_□,b(v_□,t)), g_t at its chunk start:
      W2 ← W2 (α_t I − η_t k kᵀ) − η_t ∂ℓ/∂W2,  W1 ← α_t W1 − η_t ∂ℓ/∂W1,  ℓ = ½‖M_□(k_□,t) − v̂_□,t‖²."""

    NAMES = ("M_k", "M_v", "M_eta", "M_alpha", "M_memory")

    def __init__(self, p: dict[str, Tensor], pre: str, layer: int, batch: int, c_other: int, c_mem: int) -> None:
        self.wq = p[f"{pre}.exprs.query.proj.queries_0.weight"]
        inits = {n: (f"companions.{n}[{layer}]" if n != "M_memory" else pre) for n in self.NAMES}
        self.now = {n: (rows(p[f"{q}.init1"], batch), rows(p[f"{q}.init2"], batch)) for n, q in inits.items()}
        self.conv_q = step_conv(p, pre, "query")
        self.conv_k = {n: step_conv(p, q, "key") for n, q in inits.items()}
        self.conv_v = {n: step_conv(p, q, "value") for n, q in inits.items()}
        self.chunk = {n: c_mem if n == "M_memory" else c_other for n in self.NAMES}
        self.start: dict[str, tuple[Tensor, Tensor]] = {}
        self.t = 0
        self.inputs: list[dict[str, dict[str, Tensor]]] = []

    def step(self, x_t: Tensor, eta_max: float = 0.1) -> Tensor:
        """x_t (B, d) -> o_t (B, d)."""
        for n in self.NAMES:
            if self.t % self.chunk[n] == 0:
                self.start[n] = self.now[n]
        xs = x_t.unflatten(-1, (HEADS, -1))  # (B, H, dk)
        b = self.start
        gen_k, gen_v = mlp(*b["M_k"], xs).flatten(-2), mlp(*b["M_v"], xs).flatten(-2)  # M_k,b(x_t), M_v,b(x_t)
        eta = eta_max * torch.sigmoid(mlp(*b["M_eta"], xs).mean(-1))[..., None, None]
        alpha = torch.sigmoid(mlp(*b["M_alpha"], xs).mean(-1) + 4)[..., None, None]
        q = l2n(self.conv_q(x_t @ self.wq.T).unflatten(-1, (HEADS, -1)))
        out = mlp(*self.now["M_memory"], q)  # read before: θ_{t−1}
        seen: dict[str, dict[str, Tensor]] = {"k": {}, "v": {}, "target": {}}  # per level
        seen["rates"] = {"eta": eta[..., 0, 0], "alpha": alpha[..., 0, 0]}  # shared by every level
        self.inputs.append(seen)
        for n in self.NAMES:
            k = l2n(self.conv_k[n](gen_k).unflatten(-1, (HEADS, -1)))
            v = self.conv_v[n](gen_v).unflatten(-1, (HEADS, -1))
            target = l2n(mlp(*b[n], v))  # the spec's bound on the self-generated targets
            seen["k"][n], seen["v"][n], seen["target"][n] = k, v, target
            g1, g2 = inner_grad(*b[n], k, target)
            W1, W2 = self.now[n]
            W2k = (W2 @ k[..., None])[..., 0]
            W2 = alpha * W2 - eta * W2k[..., :, None] * k[..., None, :] - eta * g2
            self.now[n] = (alpha * W1 - eta * g1, W2)
        self.t += 1
        return out.flatten(-2)


def selfmod_mixer(x: Tensor, p: dict[str, Tensor], pre: str, layer: int) -> Tensor:
    block = SelfModifying(p, pre, layer, x.shape[0], c_other=2, c_mem=4)
    return torch.stack([block.step(x[:, t]) for t in range(x.shape[1])], 1)


# ------------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------------

Mixer = Callable[[Tensor, dict[str, Tensor], str, int], Tensor]


def stacked(model: torch.nn.Module, tokens: Tensor, mixers: list[Mixer], gated: bool = False) -> Tensor:
    """embed → per layer: for each mixer residual(rmsnorm → mixer → linear), then residual(rmsnorm →
    swiglu) → rmsnorm → head. `gated` (MAG): the one mixer slot is swa(x) ⊙ σ(W_g memory(x))."""
    p = dict(model.named_parameters())
    per = (1 if gated else len(mixers)) + 1
    h = p["layers.0.weight"][tokens]
    for layer in range(SIZES["layers"]):
        base = 1 + per * layer
        if gated:
            pre = f"layers.{base}.body"
            x = rms(h, p[f"{pre}.0.weight"])
            a = mixers[0](x, p, f"{pre}.1.body.0", layer)
            m = mixers[1](x, p, f"{pre}.1.gate.0", layer)
            h = h + (a * torch.sigmoid(m @ p[f"{pre}.1.proj.weight"].T)) @ p[f"{pre}.2.proj.weight"].T
        else:
            for j, mixer in enumerate(mixers):
                pre = f"layers.{base + j}.body"
                x = rms(h, p[f"{pre}.0.weight"])
                h = h + mixer(x, p, f"{pre}.1", layer) @ p[f"{pre}.2.proj.weight"].T
        pre = f"layers.{base + per - 1}.body"
        h = h + swiglu(rms(h, p[f"{pre}.0.weight"]), p, f"{pre}.1")
    last = 1 + per * SIZES["layers"]
    return rms(h, p[f"layers.{last}.weight"]) @ p[f"layers.{last + 1}.proj.weight"].T


def continuum(model: torch.nn.Module, tokens: Tensor, mixer: str, lr: float, chunks: tuple[int, ...]) -> tuple:
    """HOPE / HOPE-Attention one token at a time: embed → per layer residual(rmsnorm → mixer → linear),
    residual(rmsnorm → MLP^(f_k)(… MLP^(f_1)(·))) → rmsnorm → head. CMS block i (NL Eq. 70–71) reads its
    chunk-start θ; at its chunk end it steps θ ← θ − ∇_θ Σ_{t in chunk} η CE(logits_t, x_{t+1}), the
    derivative at the chunk-start θ through the whole model (every other level at its own state); levels
    whose chunks end together take their gradients before any updates; the last token has no label.
    Returns the logits and the final CMS states (the partial last chunk flushed)."""
    p = dict(model.named_parameters())
    batch, length = tokens.shape
    layers = SIZES["layers"]
    cms = {(layer, i): f"layers.{2 + 2 * layer}.body.{1 + i}" for layer in range(layers) for i in range(len(chunks))}
    theta = {
        key: (rows(p[f"{pre}.init1"], batch)[:, 0], rows(p[f"{pre}.init2"], batch)[:, 0]) for key, pre in cms.items()
    }
    theta = {key: (a.detach(), b.detach()) for key, (a, b) in theta.items()}
    leaves = {key: tuple(w.clone().requires_grad_(True) for w in ab) for key, ab in theta.items()}
    blocks = []
    if mixer == "selfmod":
        blocks = [SelfModifying(p, f"layers.{1 + 2 * layer}.body.1", layer, batch, 2, 4) for layer in range(layers)]
    cache: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(layers)]
    terms: dict[tuple[int, int], list[Tensor]] = {key: [] for key in cms}
    logits: list[Tensor] = []

    def update(ends: list[tuple[int, int]]) -> None:
        grads = {key: torch.autograd.grad(sum(terms[key]), leaves[key], retain_graph=True) for key in ends}
        for key in ends:  # every gradient first, then the updates
            theta[key] = tuple((w - g).detach() for w, g in zip(leaves[key], grads[key]))
            leaves[key] = tuple(w.clone().requires_grad_(True) for w in theta[key])
            terms[key] = []

    for t in range(length):
        if t > 0:  # x_t is the label of token t − 1; chunks that ended at t − 1 update before t is read
            ce = F.cross_entropy(logits[t - 1], tokens[:, t], reduction="sum")
            for key in cms:
                terms[key].append(lr * ce)
            update([key for key in cms if t % chunks[key[1]] == 0])
        h = p["layers.0.weight"][tokens[:, t]]
        for layer in range(layers):
            pre = f"layers.{1 + 2 * layer}.body"
            x = rms(h, p[f"{pre}.0.weight"])
            if mixer == "selfmod":
                o = blocks[layer].step(x)
            else:  # causal softmax attention with rope, one query over the cached keys
                q, k, v = (x @ projection(p, f"{pre}.1", r).T for r in ("query", "key", "value"))
                cache[layer].append((q, k, v))
                qs, ks, vs = (torch.stack([c[i] for c in cache[layer]], 1) for i in range(3))
                rq, rk, sv = rope(split(qs)), rope(split(ks)), split(vs)
                o = merge(softmax_attention(rq, rk, sv))[:, -1]
            h = h + o @ p[f"{pre}.2.proj.weight"].T
            pre = f"layers.{2 + 2 * layer}.body"
            y = rms(h, p[f"{pre}.0.weight"])
            for i in range(len(chunks)):
                y = mlp(*leaves[(layer, i)], y)
            h = h + y
        last = 1 + 2 * layers
        logits.append(rms(h, p[f"layers.{last}.weight"]) @ p[f"layers.{last + 1}.proj.weight"].T)
    update([key for key in cms if terms[key]])  # the partial last chunk, without the last token's term
    return torch.stack(logits, 1), theta, blocks


# ------------------------------------------------------------------------------------------------------
# 1. Per architecture: the compiled output equals the forward written out from the papers
# ------------------------------------------------------------------------------------------------------


def titans(x: Tensor, p: dict[str, Tensor], pre: str, layer: int) -> Tensor:
    return titans_memory(x, p, pre, chunk=4)


def window8(x: Tensor, p: dict[str, Tensor], pre: str, layer: int) -> Tensor:
    return swa(x, p, pre, window=8)


def rope_attention(x: Tensor, p: dict[str, Tensor], pre: str, layer: int) -> Tensor:
    return attention(x, p, pre)


WRITTEN_OUT: dict[str, Callable[[torch.nn.Module, Tensor], Tensor]] = {
    "transformer": lambda m, x: stacked(m, x, [rope_attention]),
    "titans_lmm": lambda m, x: stacked(m, x, [titans]),
    "titans_mal": lambda m, x: stacked(m, x, [titans, window8]),
    "titans_mag": lambda m, x: stacked(m, x, [window8, titans], gated=True),
    "titans_selfmod": lambda m, x: stacked(m, x, [selfmod_mixer]),
    "hope": lambda m, x: continuum(m, x, "selfmod", 0.5, (2, 4))[0],
    "hope_attention": lambda m, x: continuum(m, x, "attention", 0.5, (2, 4))[0],
    "titans_mac": mac_model,
}


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("spec", [*RUNNING, MAC])
def test_output_equals_the_written_out_forward(spec: str, backend: str) -> None:
    model = compiled(spec, backend)
    tokens = tokens_for(2, 11, seed=1)  # T = 11: past MAL/MAG's window of 8, chunks of 4 with a partial last one
    expected = WRITTEN_OUT[spec](model, tokens)
    got = model(tokens)
    err = rel_err(got.detach(), expected.detach())
    # The runtime takes the task objective's cross-entropy in float32 even in a float64 model (see
    # test_task_gradient_has_the_model_precision), which limits the CMS specs to about 1e-8 here.
    tolerance = 1e-7 if spec.startswith("hope") else 1e-9
    assert err < tolerance, f"{spec} ({backend}): relative error {err:.2e}"


@pytest.mark.parametrize(
    "spec", ["titans_lmm", "titans_mal", "titans_mag", "titans_mac", "titans_selfmod", "hope", "hope_attention"]
)
def test_the_written_out_forward_has_teeth(spec: str) -> None:
    """The in-context updates matter on these inputs: without them (every inner lr 0) the output differs."""
    model = compiled(spec)
    tokens = tokens_for(2, 11, seed=1)
    frozen = zero_lr_model(spec, model)
    assert rel_err(frozen(tokens).detach(), model(tokens).detach()) > 1e-4


def test_task_gradient_has_the_model_precision() -> None:
    model = compiled("hope_attention")
    tokens = tokens_for(2, 11, seed=1)
    expected = WRITTEN_OUT["hope_attention"](model, tokens)
    assert rel_err(model(tokens).detach(), expected.detach()) < 1e-11


def test_task_levels_run_under_no_grad() -> None:
    model = compiled("hope_attention")
    tokens = tokens_for(1, 5, seed=3)
    expected = model(tokens).detach()
    with torch.no_grad():
        assert rel_err(model(tokens), expected) < 1e-12


def test_hope_final_cms_state_equals_the_written_out_updates() -> None:
    """The CMS states after a stream (partial last chunk flushed) equal the written-out updates."""
    model = compiled("hope")
    tokens = tokens_for(2, 11, seed=1)
    _, theta, blocks = continuum(model, tokens, "selfmod", 0.5, (2, 4))
    _, state = model(tokens, model.init_state(2), final=True)
    for (layer, i), (W1, W2) in theta.items():
        op = state.memories[f"cms[{i}][{layer}]"].op
        assert rel_err(op.W1[:, 0].detach(), W1) < 1e-7, (layer, i)
        assert rel_err(op.W2[:, 0].detach(), W2) < 1e-7, (layer, i)
        assert rel_err(W1, model.get_parameter(f"layers.{2 + 2 * layer}.body.{1 + i}.init1")[0].detach()) > 1e-6


@pytest.mark.parametrize("spec", ["titans_selfmod", "hope"])
def test_self_modifying_inputs_are_generated_at_the_producers_boundary_states(spec: str) -> None:
    """The probed keys, values (here the targets v̂ = M_□(v)), lr and retain of every memory equal the
    written-out generation at the producers' chunk-start states (NL Eq. 84–86, 90)."""
    model = compiled(spec)
    tokens = tokens_for(2, 11, seed=2)
    _, probes = model(tokens, probe=True)
    if spec == "hope":
        _, _, blocks = continuum(model, tokens, "selfmod", 0.5, (2, 4))
    else:
        p = dict(model.named_parameters())
        blocks = []
        h = p["layers.0.weight"][tokens]
        for layer in range(SIZES["layers"]):  # the block's input, as in `stacked`, keeping the written-out block
            pre = f"layers.{1 + 2 * layer}.body"
            x = rms(h, p[f"{pre}.0.weight"])
            block = SelfModifying(p, f"{pre}.1", layer, 2, c_other=2, c_mem=4)
            o = torch.stack([block.step(x[:, t]) for t in range(x.shape[1])], 1)
            blocks.append(block)
            h = h + o @ p[f"{pre}.2.proj.weight"].T
            pre = f"layers.{2 + 2 * layer}.body"
            h = h + swiglu(rms(h, p[f"{pre}.0.weight"]), p, f"{pre}.1")
    for layer, block in enumerate(blocks):

        def seen(kind: str, name: str, block: SelfModifying = block) -> Tensor:
            return torch.stack([i[kind][name] for i in block.inputs], 2).detach()

        tol = 1e-7 if spec == "hope" else 1e-10
        for name in SelfModifying.NAMES:
            probe = probes[f"{name}[{layer}]"]
            assert rel_err(probe["keys"].detach(), seen("k", name)) < tol, name
            assert rel_err(probe["lr"].detach(), seen("rates", "eta")) < tol, name
            assert rel_err(probe["retain"].detach(), seen("rates", "alpha")) < tol, name
            # v̂_□ = l2norm(M_□,b(v_□,t)): the objective's values
            assert rel_err(probe["values"].detach(), seen("target", name)) < tol, name
            assert ((seen("k", name).norm(dim=-1) - 1).abs() < 1e-9).all()
        # Each memory compares with its own targets, generated from its own filtering of M_v's output.
        assert rel_err(probes[f"M_v[{layer}]"]["values"].detach(), probes[f"M_k[{layer}]"]["values"].detach()) > 1e-6
        assert rel_err(probes[f"M_k[{layer}]"]["values"].detach(), seen("v", "M_k")) > 1e-6
        # Each level's conv(4) weights are its own: the keys of two levels differ.
        assert rel_err(seen("k", "M_k"), seen("k", "M_memory")) > 1e-6


# ------------------------------------------------------------------------------------------------------
# 2. Chunked equals reference; streaming equals one call
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "documents"),
    # C + 1 for C = 4; a prime with a second document in row 1 only (the rows are repacked, one document per
    # row); the same with documents starting at the same places in both rows (run one after another, as a
    # task's training batches are)
    [(5, "one"), (13, "row 1"), (13, "aligned")],
)
@pytest.mark.parametrize("spec", [*RUNNING, MAC])
def test_chunked_equals_reference_with_gradients(spec: str, length: int, documents: str) -> None:
    model = compiled(spec, seed=length)
    tokens = tokens_for(2, length, seed=length)
    if documents == "row 1":
        tokens[1, 6] = EOD
    elif documents == "aligned":
        tokens[:, [2, 6]] = EOD  # documents of 3, 4 and 6 tokens in each row
    weights = torch.randn(2, length, 257, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    params = list(model.parameters())
    out = {}
    for backend in ("chunked", "reference"):
        model.backend = backend
        logits = model(tokens)
        grads = torch.autograd.grad((logits * weights).sum(), params, allow_unused=True)
        out[backend] = (logits.detach(), grads)
    assert rel_err(out["chunked"][0], out["reference"][0]) < 1e-10
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, out["chunked"][1], out["reference"][1]):
        assert (a is None) == (b is None), name
        if a is not None and b is not None and b.abs().max() > 0:
            assert rel_err(a, b) < 1e-8, f"{name}: {rel_err(a, b):.2e}"
        elif a is not None and b is not None:
            assert a.abs().max() == 0, name


@pytest.mark.parametrize("length", [5, 13])
@pytest.mark.parametrize(
    "spec",
    [
        *RUNNING,
        MAC,
    ],
)
def test_streaming_token_by_token_equals_one_call(spec: str, length: int) -> None:
    model = compiled(spec, seed=length)
    tokens = tokens_for(2, length, seed=length + 1)
    whole, whole_state = model(tokens, model.init_state(2), final=True)
    assert rel_err(whole.detach(), model(tokens).detach()) < 1e-12
    state = model.init_state(2)
    pieces = []
    for t in range(length):
        out, state = model(tokens[:, t : t + 1], state, final=t == length - 1)
        pieces.append(out)
    assert rel_err(torch.cat(pieces, 1).detach(), whole.detach()) < 1e-10
    for name, mem in state.memories.items():
        for field in ("W1", "W2"):
            if hasattr(mem.op, field):
                a, b = getattr(mem.op, field), getattr(whole_state.memories[name].op, field)
                assert rel_err(a.detach(), b.detach()) < 1e-10, f"{name}.{field}"


# ------------------------------------------------------------------------------------------------------
# 3. In-context learning is real
# ------------------------------------------------------------------------------------------------------


def zero_lr_model(spec: str, trained: torch.nn.Module, **params: object) -> torch.nn.Module:
    """The same system with every inner learning rate (task levels too) replaced by the constant 0,
    carrying the trained weights. Only the lr projections are left over."""
    plan = to_plan(front_end(SPECS_DIR / f"{spec}.nest", {**SIZES, **SMALL[spec], **params}))
    for level in plan.levels.values():
        if "lr" in level.rates:
            level.rates["lr"].expr = {"op": "const", "value": 0.0}
    model = nestc_runtime.build(plan).to(next(trained.parameters()).dtype)
    result = model.load_state_dict(trained.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(".rates.lr." in key for key in result.unexpected_keys), result.unexpected_keys
    return model


# ------------------------------------------------------------------------------------------------------
# 4. HOPE: the CMS changes exactly at its chunk ends; each generated-input memory lowers its own loss
# ------------------------------------------------------------------------------------------------------


def test_hope_cms_changes_exactly_at_chunk_ends() -> None:
    model = compiled("hope")  # chunks [2, 4]
    tokens = tokens_for(1, 13, seed=5)
    state = model.init_state(1)
    names = {"cms[0][0]": 2, "cms[1][0]": 4, "cms[0][1]": 2, "cms[1][1]": 4}
    previous = {n: state.memories[n].op.W1.clone() for n in names}
    for t in range(13):
        _, state = model(tokens[:, t : t + 1], state)
        for name, chunk in names.items():
            now = state.memories[name].op.W1
            changed = not torch.equal(now, previous[name])
            # The update of the chunk ending at token t − 1 waits for x_t: it lands during call t.
            assert changed == (t >= chunk and t % chunk == 0), f"{name} token {t}: changed={changed}"
            previous[name] = now.clone()


@pytest.mark.parametrize("name", ["M_k", "M_v", "M_eta", "M_alpha"])
def test_hope_generators_lower_their_own_inner_loss(name: str) -> None:
    """Over each chunk of C_other = 2 tokens, ½ Σ_t ‖M(k_t) − v̂_t‖² (probed keys and targets) is lower at
    the state after the chunk than at its start, with M(x) = x + W1 σ(W2 x) written out here.

    Retention is set to 1 (a plan edit; the weights are the same): the spec's α = σ(mean M_α(x)) is about
    0.5 at initialisation, a deliberate forgetting that by itself moves M away from its targets (with it,
    most chunks do not lower the loss), so this checks the learning part of the DGD step."""
    torch.manual_seed(0)
    plan = to_plan(front_end(SPECS_DIR / "hope.nest", {**SIZES, **SMALL["hope"]}))
    for level in SelfModifying.NAMES:
        plan.levels[level].rates["retain"].expr = {"op": "const", "value": 1.0}
    model = nestc_runtime.build(plan).double()
    tokens = tokens_for(2, 12, seed=6)
    state = model.init_state(2)
    instance = f"{name}[0]"
    chunk_probes, start = [], None
    lowered, total = 0, 0
    for t in range(12):
        if t % 2 == 0:
            op = state.memories[instance].op
            start, chunk_probes = (op.W1.detach(), op.W2.detach()), []
        _, state, probes = model(tokens[:, t : t + 1], state, probe=True)
        chunk_probes.append(probes[instance])
        if t % 2 == 1:
            k = torch.cat([p["keys"] for p in chunk_probes], 2).detach()
            v = torch.cat([p["values"] for p in chunk_probes], 2).detach()
            op = state.memories[instance].op
            end = (op.W1.detach(), op.W2.detach())

            def loss(W: tuple[Tensor, Tensor], k: Tensor = k, v: Tensor = v) -> Tensor:
                return 0.5 * (mlp(W[0][:, :, None], W[1][:, :, None], k) - v).pow(2).sum((-1, -2))  # (B, H)

            before, after = loss(start), loss(end)
            lowered += int((after < before).sum())
            total += after.numel()
    assert lowered == total, f"{instance}: lowered its loss on {lowered} of {total} (row, head, chunk)s"


# ------------------------------------------------------------------------------------------------------
# 3. In-context learning (one shared short training run per spec)
# ------------------------------------------------------------------------------------------------------

ICL_VOCAB, ICL_BLOCK = 16, 8
# The head covers the task's 16 ids and EOD (id 16). With the default 257 ids the first ~150 AdamW steps go
# to suppressing 241 ids that never occur (the head's norm grows 1.8 -> 24) while every memory path sits on
# the ln 16 plateau; with 17 ids Titans LMM leaves the plateau after ~40 steps instead of ~200 (issue 15).
ICL_SIZES = {"d": 32, "layers": 1, "vocab": ICL_VOCAB + 1}
# Budget: batch 32, AdamW lr 1e-2 (3e-2 stalls Titans on the plateau and diverges self-modifying Titans),
# 100 steps, measured to leave the plateau with margin for LMM, MAL and MAG (about 10 s each on 2 CPU cores).
# Self-modifying Titans: its only token mixing is the conv(4) on q, k, v, and its in-context gain is small
# (for unit keys one DGD step stores about η of the error; see the fragment's header), so one layer needs
# eta_max = 0.3 and 400 steps to leave the plateau; chunks of 8 (the spec's C_other; the 16-token
# sequences make two M_memory chunks) cost about 0.06 s a step against 0.23 s for chunks of 2 and 4.
# Measured second pass (with / without inner lrs) at init seeds 0, 1: 1.11 / 2.78, 2.22 / 2.80; at 300 steps
# seed 1 was still at 2.57, at 500 steps 1.78, seed 2 0.27. At eta_max 0.005-0.05 (100 steps) it stayed at
# 2.71-2.79. HOPE leaves it within 40 steps at eta_max 0.005 (its CMS levels learn the task in context).
# (Before the spec l2-normalised its self-generated targets, the loop v = M_v(x) -> target M_v(v) overflowed
# to NaN in the first sequence at eta_max = 0.1 and grew the targets tenfold over 10 outer steps at 0.02.)
ICL_BATCH, ICL_LR, ICL_STEPS = 32, 1e-2, 100
ICL_OVERRIDES: dict[str, dict[str, object]] = {
    "titans_selfmod": {"steps": 400, "eta_max": 0.3, "c_other": 8, "c_mem": 8},
    "hope": {"steps": 40, "eta_max": 0.005},
}


def repeated_blocks(seed: int, batch: int) -> Tensor:
    block = torch.randint(0, ICL_VOCAB, (batch, ICL_BLOCK), generator=torch.Generator().manual_seed(seed))
    return torch.cat([block, block], 1)


def second_pass_loss(model: torch.nn.Module, tokens: Tensor) -> float:
    logits = model(tokens)
    return F.cross_entropy(logits[:, ICL_BLOCK:-1].flatten(0, 1), tokens[:, ICL_BLOCK + 1 :].flatten()).item()


@pytest.fixture(scope="module")
def icl_results() -> dict[str, tuple[float, float]]:
    out = {}
    for spec in RUNNING:
        torch.manual_seed(0)
        overrides = dict(ICL_OVERRIDES.get(spec, {}))
        steps = int(overrides.pop("steps", ICL_STEPS))  # type: ignore[call-overload]
        params = {**ICL_SIZES, **overrides}
        model = nestc.compile(SPECS_DIR / f"{spec}.nest", **{**SIZES, **SMALL[spec], **params})
        optimizer = torch.optim.AdamW(model.parameters(), lr=ICL_LR, weight_decay=0.0)
        for step in range(steps):
            tokens = repeated_blocks(100 + step, ICL_BATCH)
            logits = model(tokens)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        test = repeated_blocks(7, 32)  # not under no_grad: see test_task_levels_run_under_no_grad
        out[spec] = (second_pass_loss(model, test), second_pass_loss(zero_lr_model(spec, model, **params), test))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        "titans_lmm",
        "titans_mal",
        "titans_mag",
        "titans_selfmod",
        "hope",
    ],
)
def test_in_context_learning_is_real(spec: str, icl_results: dict[str, tuple[float, float]]) -> None:
    """The second pass of a repeated block is learned in context: at least 10% lower loss with the inner
    lrs as trained than with them 0, and below 0.9 ln V (a model that only breaks when its inner lrs are
    zeroed, such as a one-layer DeltaNet without conv at 2.66 against 3.88, does not count)."""
    learned, frozen = icl_results[spec]
    print(f"{spec} second pass {learned:.3f} with inner lrs, {frozen:.3f} without")
    assert learned < 0.9 * frozen, f"{spec}: second pass {learned:.3f} with inner lrs, {frozen:.3f} without"
    assert learned < 0.9 * math.log(ICL_VOCAB), f"{spec}: second pass {learned:.3f}, ln V = {math.log(ICL_VOCAB):.3f}"


@pytest.mark.slow
def test_in_context_learning_transformer_for_comparison(icl_results: dict[str, tuple[float, float]]) -> None:
    """Attention is non-parametric: no inner lr, so the two numbers are equal; printed for comparison."""
    learned, frozen = icl_results["transformer"]
    print(f"transformer second pass {learned:.3f}, ln V = {math.log(ICL_VOCAB):.3f}")
    assert learned == pytest.approx(frozen)

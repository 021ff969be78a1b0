"""Two generic refinements shared by the parametric memories: an output map on a linear memory, and an
objective summed over a sliding window of keys and values (the Omega rule).

Output map (a depth-1 MLP memory, TTT-Linear's inner model): with z = S x the memory's output is

    M(x) = z,  x + z,  LN(z)  or  x + LN(z)          (``residual``, ``norm``; LN parameter-free over d)

and the inner gradient of ℓ(M(k), v) with respect to S stays rank one, g = δ kᵀ, with
δ = ∂ℓ/∂z = LN'(z)ᵀ e (or e without the norm), e = ∂ℓ/∂M(k) (``gradient_signal``).

Window (Atlas's Omega rule, Behrouz et al. 2025, Eq. 9): token t's objective sums the loss of the last c
keys and values of its document, ℓ_t(θ) = Σ_{i=t−c+1}^{t} ℓ(θ; k_i, v_i), so g_t = Σ_i ∇ℓ(θ; k_i, v_i) at
t's linearisation point (DESIGN §3). The keys and values arrive stacked, (B, H, T, c, d), oldest first,
zeros before the document start (a zero key adds nothing: every gradient here is a sum of e kᵀ or of
δ σ(W2 k)ᵀ and u kᵀ with σ(0) = 0). ``windows`` builds the stacks from a carried history, so streaming
stays exact.

With ``gd`` the windowed level equals the plain level run on c "virtual tokens" per token (``expand``):
entry (t, j) carries k_{t−j}, v_{t−j} and η_t, with α_t on the group's first entry and 1 on the others,
chunks of c·C entries; S_t is the state after the group's last entry, S_{t−1} the state before its
first. The chunk-parallel forms then apply unchanged (``collapse`` keeps each token's read).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor


def layer_norm(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Parameter-free LayerNorm over the last axis: (n, r) with n = (z - mean) r, r = 1/√(var + eps)."""
    centred = z - z.mean(-1, keepdim=True)
    r = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return centred * r, r


def layer_norm_backward(e: Tensor, n: Tensor, r: Tensor) -> Tensor:
    """∂/∂z of ⟨e, LN(z)⟩: r (e - mean(e) - n mean(e ⊙ n))."""
    return r * (e - e.mean(-1, keepdim=True) - n * (e * n).mean(-1, keepdim=True))


def memory_output(z: Tensor, x: Tensor, residual: bool, norm: bool, eps: float) -> Tensor:
    """M(x) from z = S x: [x +] [LN](z)."""
    y = layer_norm(z, eps)[0] if norm else z
    return x + y if residual else y


def gradient_signal(z: Tensor, e_of: Any, x: Tensor, residual: bool, norm: bool, eps: float) -> Tensor:
    """δ = ∂ℓ/∂z at z = S k, given e_of(M(k)) = ∂ℓ/∂M(k)."""
    if not norm:
        return e_of(z + x if residual else z)
    n, r = layer_norm(z, eps)
    e = e_of(x + n if residual else n)
    return layer_norm_backward(e, n, r)


# ---------------------------------------------------------------- windows of keys and values


def windows(x: Tensor, history: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """Stacks of the last c inputs and the history after the call.

    x: (B, H, T, d); history: (B, H, c−1, d), the last c−1 inputs before the call, oldest first.
    Returns (B, H, T, c, d) with entry j = c−1 the current token, and the new history: the last c−1
    inputs up to each row's last valid token (lengths (B,) or None for all T).
    """
    past = history.shape[2]
    full = torch.cat([history, x], 2)  # (B, H, c−1+T, d)
    stacks = full.unfold(2, past + 1, 1).transpose(-1, -2)  # (B, H, T, c, d)
    steps = x.shape[2]
    used = lengths if lengths is not None else torch.full((x.shape[0],), steps, device=x.device)
    index = used[:, None] + torch.arange(past, device=x.device)  # positions used .. used+c−2 in `full`
    gather = index[:, None, :, None].expand(x.shape[0], x.shape[1], past, x.shape[3])
    return stacks, full.gather(2, gather)


def expand(x: dict[str, Tensor], window: int) -> dict[str, Tensor]:
    """The c virtual tokens of every token (module docstring): keys and values (B,H,T,c,d) flattened to
    (B,H,T·c,d); q, η and β repeated; α on each group's first entry, 1 on the others."""
    out = {"keys": x["keys"].flatten(2, 3), "values": x["values"].flatten(2, 3)}
    out["queries"] = x["queries"].repeat_interleave(window, 2)
    out["lr"] = x["lr"].repeat_interleave(window, 2)
    retain = x["retain"]
    first = torch.zeros(window, dtype=torch.bool, device=retain.device)
    first[0] = True
    spread = retain.repeat_interleave(window, 2)
    mask = first.repeat(retain.shape[2])
    mask = mask if retain.dim() == 3 else mask[:, None]
    out["retain"] = torch.where(mask, spread, torch.ones_like(spread))
    return out


def collapse(o: Tensor, window: int, read: str) -> Tensor:
    """Each token's read from its group of virtual tokens: the first entry's for `before` (the state
    before the token), the last entry's otherwise (`online`: after it; `boundary`: the same chunk start)."""
    groups = o.unflatten(2, (-1, window))
    return groups[:, :, :, 0] if read == "before" else groups[:, :, :, -1]


def virtual_state(state: Any, window: int) -> Any:
    """The op state in virtual-token phase (phase · c)."""
    return replace(state, phase=state.phase * window)


def real_state(state: Any, window: int) -> Any:
    """Back from virtual-token phase (every group ends on a real token, so the phase divides)."""
    return replace(state, phase=torch.div(state.phase, window, rounding_mode="floor"))


def run_memory(
    scan: Any, chunked: Any, x: dict[str, Tensor], state: Any, cfg: Any, lengths: Tensor | None, reference: bool
):
    """A memory op over a window of tokens: the per-token oracle, or the fast path. A windowed objective
    with `gd` runs the fast path on the virtual tokens (module docstring); with another optimizer it has
    no virtual-token form and the fast path runs its compiled scan (the documented fallback, DESIGN §3)."""

    def call(op: Any, inputs: dict[str, Tensor], st: Any, config: Any, rows: Tensor | None) -> tuple[Tensor, Any]:
        names = ("queries", "keys", "values", "lr", "retain")
        return op(*(inputs[n] for n in names), st, config, lengths=rows, momentum=inputs.get("momentum"))

    c = cfg.window
    if reference or c == 1 or cfg.optimizer != "gd":
        return call(scan if reference else chunked, x, state, cfg, lengths)
    virtual = replace(cfg, window=1, chunk=cfg.chunk * c)
    out, after = call(chunked, expand(x, c), virtual_state(state, c), virtual, None if lengths is None else lengths * c)
    return collapse(out, c, cfg.read), real_state(after, c)

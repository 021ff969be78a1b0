"""Evaluate plan expressions (projections, rates) on a level's input, over a whole window at once.

Values are tensors (B, T, width). `linear` projects to the width its use needs (queries/keys/values get
heads × head-dim, a per-head rate `heads`, a per-channel rate heads × d_k, a scalar 1). `l2norm`, `mean`
and `rope` act per head. `conv(k, ·)` is a depthwise causal convolution: the one stateful function, whose
last k−1 inputs travel in the level's state so that streaming stays exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.sequence_layers import CausalConv, ConvState, Rope

ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softplus": F.softplus,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "relu": torch.relu,
}

ConvStates = dict[str, ConvState]
# reader(level, mode, value (B, T, width)) -> that level's memory applied to value at the stated state
Reader = Callable[[str, str, Tensor], Tensor]


class Context:
    """What an expression may look at besides x: other levels' memories and this level's own roles."""

    def __init__(self, reader: Reader | None = None, roles: dict[str, Tensor] | None = None) -> None:
        self.reader = reader
        self.roles = roles if roles is not None else {}


def _children(expr: dict[str, Any]) -> list[dict[str, Any]]:
    return [expr[k] for k in ("arg", "left", "right") if k in expr]


def _walk(expr: dict[str, Any]) -> list[dict[str, Any]]:
    out = [expr]
    for child in _children(expr):
        out.extend(_walk(child))
    return out


class Expression(nn.Module):
    """One compiled expression with its own projections and convolutions."""

    def __init__(self, expr: dict[str, Any], d_in: int, width: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.expr = expr
        self.heads, self.head_dim, self.width = heads, head_dim, width
        self.proj = nn.ModuleDict()
        self.convs = nn.ModuleDict()
        self._build(expr, d_in, width, "e")
        self.rope = Rope(head_dim) if any(n["op"] == "fn" and n["fn"] == "rope" for n in _walk(expr)) else None

    def _build(self, e: dict[str, Any], d_in: int, width: int, path: str) -> int:
        """Create the modules of `e` (at `path` in the tree) given the width its context asks for;
        returns its output width."""
        op = e["op"]
        if op == "const":
            return 1
        if op in ("input", "read", "role"):
            if op == "read":
                self._build(e["arg"], d_in, d_in, path + "_a")
            return d_in
        if op == "linear":
            self._build(e["arg"], d_in, d_in, path + "_a")
            self.proj[e["id"]] = nn.Linear(d_in, width, bias=False)
            return width
        if op == "fn":
            inner = self.heads * self.head_dim if e["fn"] == "mean" else width
            arg_width = self._build(e["arg"], d_in, inner, path + "_a")
            if e["fn"] == "conv":
                self.convs[path] = CausalConv(arg_width, int(e["size"]))
            return self.heads if e["fn"] == "mean" else arg_width
        left = self._build(e["left"], d_in, width, path + "_l")
        return max(left, self._build(e["right"], d_in, width, path + "_r"))

    def initial_conv_states(self, batch: int, like: Tensor) -> ConvStates:
        return {key: CausalConv.initial_state(conv, batch, like) for key, conv in self.convs.items()}  # type: ignore[arg-type]

    def forward(
        self, x: Tensor, positions: Tensor, convs: ConvStates, lengths: Tensor | None, context: Context | None = None
    ) -> tuple[Tensor, ConvStates]:
        """x: (B, T, d); positions: (B, T) token positions from the document start (for rope)."""
        new_convs = dict(convs)
        self._context = context or Context()
        out = self._eval(self.expr, "e", x, positions, new_convs, lengths)
        if out.shape[-1] == 1 and self.width > 1:
            out = out.expand(*x.shape[:-1], self.width)
        return out, new_convs

    def _eval(
        self, e: dict[str, Any], path: str, x: Tensor, pos: Tensor, convs: ConvStates, lengths: Tensor | None
    ) -> Tensor:
        op = e["op"]
        if op == "const":
            return x.new_full((*x.shape[:-1], 1), float(e["value"]))
        if op == "input":
            return x
        if op == "role":
            return self._context.roles[e["role"]]
        if op == "read":
            assert self._context.reader is not None, "a level read needs the level's group to run it"
            return self._context.reader(
                e["level"], e["mode"], self._eval(e["arg"], path + "_a", x, pos, convs, lengths)
            )
        if op == "linear":
            return self.proj[e["id"]](self._eval(e["arg"], path + "_a", x, pos, convs, lengths))
        if op == "fn":
            arg = self._eval(e["arg"], path + "_a", x, pos, convs, lengths)
            return self._function(e, path, arg, pos, convs, lengths)
        left = self._eval(e["left"], path + "_l", x, pos, convs, lengths)
        right = self._eval(e["right"], path + "_r", x, pos, convs, lengths)
        kind = e["kind"]
        if kind == "+":
            return left + right
        if kind == "-":
            return left - right
        return left * right if kind == "*" else left / right

    def _function(
        self, e: dict[str, Any], path: str, arg: Tensor, pos: Tensor, convs: ConvStates, lengths: Tensor | None
    ) -> Tensor:
        fn = e["fn"]
        if fn == "conv":
            out, convs[path] = self.convs[path](arg, convs[path], lengths)
            return out
        if fn == "l2norm":
            return F.normalize(self._heads(arg), dim=-1, eps=1e-6).flatten(-2)
        if fn == "mean":
            return self._heads(arg).mean(-1)
        if fn == "rope":
            assert self.rope is not None
            split = self._heads(arg).transpose(1, 2)  # (B, H, T, dh)
            return self.rope.rotate(split, pos).transpose(1, 2).flatten(-2)
        return ELEMENTWISE[fn](arg)

    def _heads(self, v: Tensor) -> Tensor:
        heads = self.heads if v.shape[-1] % self.heads == 0 else 1
        return v.unflatten(-1, (heads, v.shape[-1] // heads))

"""Evaluate plan expressions (projections, rates) on a level's input, token-parallel.

Values are tensors (..., width). `linear` projects the level input (width d) to the width its use needs:
queries/keys/values get heads × head-dim, a per-head rate gets `heads`, a scalar rate 1. `l2norm` acts per
head, so `linear(x) |> l2norm` normalises each head's key on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softplus": F.softplus,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "relu": torch.relu,
}


def linear_ids(expr: dict[str, Any]) -> list[str]:
    """The ids of every `linear` in an expression, outermost first."""
    out = []
    if expr["op"] == "linear":
        out.append(expr["id"])
    for key in ("arg", "left", "right"):
        if key in expr:
            out.extend(linear_ids(expr[key]))
    return out


class Expression(nn.Module):
    """One compiled expression with its own projections (an `nn.Linear` per `linear` in it)."""

    def __init__(self, expr: dict[str, Any], d_in: int, width: int, heads: int) -> None:
        super().__init__()
        self.expr = expr
        self.heads = heads
        self.width = width
        self.proj = nn.ModuleDict({i: nn.Linear(d_in, width, bias=False) for i in linear_ids(expr)})

    def forward(self, x: Tensor) -> Tensor:
        out = self._eval(self.expr, x)
        if out.shape[-1] == 1 and self.width > 1:
            out = out.expand(*x.shape[:-1], self.width)
        return out

    def _eval(self, e: dict[str, Any], x: Tensor) -> Tensor:
        op = e["op"]
        if op == "const":
            return x.new_full((*x.shape[:-1], 1), float(e["value"]))
        if op == "input":
            return x
        if op == "linear":
            return self.proj[e["id"]](self._eval(e["arg"], x))
        if op == "fn":
            arg = self._eval(e["arg"], x)
            if e["fn"] == "l2norm":
                return self._per_head_l2norm(arg)
            return ELEMENTWISE[e["fn"]](arg)
        left, right = self._eval(e["left"], x), self._eval(e["right"], x)
        kind = e["kind"]
        if kind == "+":
            return left + right
        if kind == "-":
            return left - right
        return left * right if kind == "*" else left / right

    def _per_head_l2norm(self, v: Tensor) -> Tensor:
        heads = self.heads if v.shape[-1] % self.heads == 0 else 1
        split = v.unflatten(-1, (heads, v.shape[-1] // heads))
        return F.normalize(split, dim=-1, eps=1e-6).flatten(-2)

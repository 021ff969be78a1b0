"""The stateless layers of a model (DESIGN §5 `layer` registry): token-wise maps on (..., d) tensors.

Each works on any leading shape, so the reference interpreter can run them on one token (B, d) and the
chunked runtime on whole sequences (B, T, d). Stateful levels live in `memory_layer.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Embed(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, d) * 0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight)


class Head(nn.Module):
    """The output projection to vocabulary logits (untied from the embedding)."""

    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, vocab, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h)


class Linear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, h: Tensor) -> Tensor:
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class L2Norm(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return F.normalize(h, dim=-1, eps=1e-6)


# The registry of stateless layers by plan op; `embed` and `head` also need the vocabulary size.
LAYERS: dict[str, Callable[[int, int], nn.Module]] = {
    "embed": lambda d, vocab: Embed(vocab, d),
    "head": lambda d, vocab: Head(d, vocab),
    "linear": lambda d, vocab: Linear(d),
    "rmsnorm": lambda d, vocab: RMSNorm(d),
    "l2norm": lambda d, vocab: L2Norm(),
}

"""Newton–Schulz orthogonalisation (Muon-style output map, DESIGN §5, NL Eq. 42/52)."""

from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def newton_schulz(X: Tensor, steps: int) -> Tensor:
    """NS_steps(X) for every matrix of X (..., rows, cols), per matrix and per head.

    X ← X / (‖X‖_F + 1e-7); transpose if rows > cols; ``steps`` times
    X ← aX + b(XXᵀ)X + c(XXᵀ)²X with (a, b, c) = (3.4445, -4.7750, 2.0315); transpose back.
    The computation runs in X's dtype (no down-cast); differentiable, with a zero (not NaN) gradient
    where X = 0 (the norm is taken through a guarded square root).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if X.dim() < 2:
        raise ValueError(f"newton_schulz needs matrices (..., rows, cols), got shape {tuple(X.shape)}")
    a, b, c = NS_COEFFICIENTS
    squares = X.pow(2).sum((-2, -1), keepdim=True)
    positive = squares > 0
    norm = torch.where(positive, torch.where(positive, squares, torch.ones_like(squares)).sqrt(), 0.0)
    Y = X / (norm + NS_EPS)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        Y = Y.transpose(-1, -2)
    for _ in range(steps):
        gram = Y @ Y.transpose(-1, -2)
        Y = a * Y + (b * gram + c * gram @ gram) @ Y
    if tall:
        Y = Y.transpose(-1, -2)
    return Y

"""One-level orthonormal Haar transform along rows or columns (docs/method.md section 5).

Pairs neighbours (0,1), (2,3), ... along ``dim``: ``low = (a+b)/sqrt2``, ``high = (a-b)/sqrt2``.
The inverse uses ``1/sqrt2`` (``"exact"``) or the authors' rounded ``0.70703125`` (``"authors"``).
"""
from __future__ import annotations

import math

import torch

FORWARD = 1.0 / math.sqrt(2.0)
INVERSE = {"exact": 1.0 / math.sqrt(2.0), "authors": 0.70703125}


def haar_forward(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` along ``dim`` (even length) into ``(low, high)``, each half as long."""
    n = x.shape[dim]
    if n % 2:
        raise ValueError(f"Haar transform needs an even length along dim {dim}, got {n} "
                         f"(shape {tuple(x.shape)}); pad the weight or use another layout")
    d = dim if dim >= 0 else dim + x.dim()
    pairs = x.unflatten(d, (n // 2, 2))
    even, odd = pairs.select(d + 1, 0), pairs.select(d + 1, 1)
    return (even + odd) * FORWARD, (even - odd) * FORWARD


def haar_inverse(low: torch.Tensor, high: torch.Tensor, dim: int, inverse: str = "exact") -> torch.Tensor:
    """Inverse of :func:`haar_forward`: interleave ``(low+high)*c`` and ``(low-high)*c`` along ``dim``."""
    c = INVERSE[inverse]
    even, odd = (low + high) * c, (low - high) * c
    d = dim if dim >= 0 else dim + low.dim()
    return torch.stack((even, odd), dim=d + 1).flatten(d, d + 1)

"""Masked row-wise binarizers (docs/method.md section 3).

All functions work on the last dimension of ``x`` (``(..., n)``) with a boolean ``mask`` of the same
(or a broadcastable) shape; statistics are per row over the masked entries and the result is 0
outside the mask. Rows with no masked entries give 0. ``sign(0) = 0`` is kept.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

SCALES = ("abs", "rms")


class Binarized(NamedTuple):
    """``q = sign * scale + mean`` on the mask. q, sign: like ``x``; mean, scale: ``(..., 1)``."""

    q: torch.Tensor
    sign: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor


def binarize(x: torch.Tensor, mask: torch.Tensor, scale: str = "abs",
             mean: torch.Tensor | None = None) -> Binarized:
    """1st-order binarization: B1_abs (``scale="abs"``, a = mean|x-m|) or B1_rms (``"rms"``,
    a = sqrt(mean (x-m)^2)). ``mean`` (``(..., 1)``) replaces the group mean (shared-mean variant)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not one of {SCALES}")
    mf = mask.to(x.dtype)
    n = mf.sum(-1, keepdim=True).clamp(min=1)
    m = (x * mf).sum(-1, keepdim=True) / n if mean is None else mean
    d = x - m
    dev = d.abs() if scale == "abs" else d * d
    a = (dev * mf).sum(-1, keepdim=True) / n
    if scale == "rms":
        a = a.sqrt()
    sign = torch.sign(d) * mf
    return Binarized((sign * a + m) * mf, sign, m, a)


def binarize2(x: torch.Tensor, mask: torch.Tensor) -> tuple[Binarized, Binarized]:
    """B2: B1_abs of ``x``, then B1_abs of the residual; the value is ``first.q + second.q``."""
    first = binarize(x, mask, "abs")
    second = binarize(x - first.q, mask, "abs")
    return first, second

"""The ``repeat`` knob: a tiny deterministic jitter of a finished Hessian, to measure how much a
result moves when only float rounding changes (the "tie noise" of near-tied choices: a salient
column, a split threshold), apart from the calibration-sample noise that ``seed`` measures.

``H' = H * (1 + EPS * U)``, ``U`` symmetric with entries uniform in [-1, 1], drawn from a
generator seeded by ``(repeat, name)``: about 8 float32 ulps per entry, the size of the rounding
differences between two summation orders (thread counts, devices, code revisions) of the
``2/N X^T X`` accumulation. ``repeat = 0`` returns ``H`` itself (the default: no jitter).
"""
from __future__ import annotations

import zlib

import torch

EPS = 1e-6  # relative size of the jitter


def jitter_hessian(H: torch.Tensor, repeat: int, name: str = "") -> torch.Tensor:
    """``H`` (n, n) float, jittered for repeat ``repeat`` (> 0) of the linear ``name``; the
    same (repeat, name) always gives the same result on any device. ``repeat == 0``: ``H``."""
    if repeat == 0:
        return H
    if repeat < 0:
        raise ValueError(f"repeat must be >= 0, got {repeat}")
    gen = torch.Generator().manual_seed(zlib.crc32(f"{repeat}/{name}".encode()))
    u = torch.rand(H.shape, generator=gen, dtype=torch.float64) * 2 - 1
    u = (u + u.T) / 2
    return (H.double() * (1 + EPS * u).to(H.device)).to(H.dtype)

"""Uniform (integer grid) quantization with min-max statistics, as the GPTQ repository's
``Quantizer`` (IST-DASLab/gptq quant.py, per channel, no MSE search): shared by RTN, GPTQ and
PB-LLM's high-bit part. The range always includes 0; symmetric grids centre the zero point."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bits import FP_BITS


def minmax_params(x: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` ``(..., 1)`` of the grid ``scale * (q - zero)``, ``q`` in ``[0, maxq]``,
    over the last dim of ``x`` ``(..., n)``: ``[min(x, 0), max(x, 0)]`` (symmetric: widened to
    ``[-m, m]`` when the minimum is negative; an all-zero range becomes ``[-1, 1]``)."""
    xmin = x.amin(-1, keepdim=True).clamp(max=0)
    xmax = x.amax(-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, 0, maxq)`` (float tensor like ``x``)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def group_params(x: torch.Tensor, groupsize: int, maxq: int, sym: bool):
    """Min-max grids of consecutive column groups of ``x`` ``(R, C)`` (the last one may be
    shorter): ``(scale, zero)`` each ``(R, ceil(C / groupsize))``."""
    R, C = x.shape
    full = C // groupsize
    parts = []
    if full:
        parts.append(minmax_params(x[:, :full * groupsize].reshape(R, full, groupsize), maxq, sym))
    if C % groupsize:
        parts.append(minmax_params(x[:, full * groupsize:].unsqueeze(1), maxq, sym))
    scale = torch.cat([p[0] for p in parts], 1)[..., 0]
    zero = torch.cat([p[1] for p in parts], 1)[..., 0]
    return scale, zero


@dataclass
class UniformCodes:
    """A weight ``(R, C)`` on per-(row, group) integer grids: ``q`` uint8 codes in
    ``[0, 2^wbits)``; ``scale``, ``zero`` ``(R, G)``; ``group`` ``(C,)`` the group of every column.
    ``explicit_groups``: the column -> group map is stored (GPTQ act_order without static groups:
    groups follow the activation order); otherwise it is ``column // groupsize``. ``sym``: the zero
    point is the fixed grid centre (not stored)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group: torch.Tensor
    wbits: int
    sym: bool
    explicit_groups: bool = False

    @property
    def salient(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long, device=self.q.device)

    def dequantize(self) -> torch.Tensor:
        return self.scale[:, self.group] * (self.q.float() - self.zero[:, self.group])

    def stored_bits(self) -> int:
        G = self.scale.shape[1]
        zero = 0 if self.sym else self.wbits * self.zero.numel()
        group_map = self.group.numel() * math.ceil(math.log2(G)) if self.explicit_groups and G > 1 else 0
        return self.q.numel() * self.wbits + FP_BITS * self.scale.numel() + zero + group_map


def uniform_bits(cfg, codes: UniformCodes) -> tuple[int, int]:
    """``(paper, full)``: paper ``wbits`` per weight; full adds per (row, group) an fp16 scale and a
    ``wbits`` zero point (asymmetric), and ``ceil(log2 G)`` bits per column when the column -> group
    map is stored."""
    R, C = codes.q.shape
    G = codes.scale.shape[1]
    full = R * C * cfg.wbits + R * G * (FP_BITS + (0 if codes.sym else cfg.wbits))
    if codes.explicit_groups and G > 1:
        full += C * math.ceil(math.log2(G))
    return R * C * cfg.wbits, full

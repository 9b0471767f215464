"""Sign binarization baseline: per row of a block, ``sign(w - m) * mean|w - m| + m`` (B1_abs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .binarize import Binarized, binarize
from .bits import FP_BITS, binarized_bits


@dataclass
class SignCodes:
    """One block ``(R, C)``: its B1_abs sign, mean and scale per row; no salient columns."""

    main: Binarized

    @property
    def salient(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long, device=self.main.sign.device)

    def dequantize(self) -> torch.Tensor:
        return self.main.sign * self.main.scale + self.main.mean

    def stored_bits(self) -> int:
        return binarized_bits(self.main)


def sign_block(w: torch.Tensor, d: torch.Tensor, cfg):
    """Quantize a block ``w`` ``(R, C)``. Returns ``(q, codes)``."""
    b = binarize(w, torch.ones_like(w, dtype=torch.bool), "abs")
    return b.q, SignCodes(b)


def sign_bits(cfg, codes: SignCodes) -> tuple[int, int]:
    """``(paper, full)``: 1 bit per weight; plus an fp16 mean and scale per row."""
    R, C = codes.main.sign.shape
    return R * C, R * C + R * 2 * FP_BITS

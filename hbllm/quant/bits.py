"""Shared pieces of the bit accounting (docs/quantizers.md gives every method's formulas).

paper: the convention of the method's paper. full: exactly what a packed checkpoint stores,
counted per method in its module, with 16 bits per fp16 statistic.
"""
from __future__ import annotations

import math

from .binarize import Binarized
from .split_search import SplitCodes

FP_BITS = 16


def index_bits(n: int) -> int:
    """Bits of one index among ``n`` (a salient column inside a block of ``n``)."""
    return max(1, math.ceil(math.log2(n)))


def binarized_bits(b: Binarized) -> int:
    """Stored bits of a :class:`Binarized` group: one sign bit per entry, fp16 mean and scale."""
    return b.sign.numel() + FP_BITS * (b.mean.numel() + b.scale.numel())


def split_bits(c: SplitCodes) -> int:
    """Stored bits of :class:`SplitCodes`: sign and membership bit per entry, fp16 statistics."""
    return c.sign.numel() + c.upper.numel() + FP_BITS * (c.mean.numel() + c.scale.numel())

"""Bit accounting (METHOD.md section 7), per GPTQ block of ``R`` rows, ``C`` columns, ``k`` salient.

paper: 1 bit per binarized coefficient, plus 1 per salient coefficient for its residual.
full: exactly what a packed checkpoint stores: 1 sign bit per binarized coefficient (twice for
B2), 1 membership bit per coefficient of every split, ``ceil(log2(blocksize))`` bits per salient
column index, and 16 bits per fp16 mean and scale (per band row, per group).
"""
from __future__ import annotations

import math

from .binarize import Binarized
from .split_search import SplitCodes

FP_BITS = 16


def index_bits(blocksize: int) -> int:
    """Bits of one salient column index inside a block."""
    return max(1, math.ceil(math.log2(blocksize)))


def block_bits(method: str, layout: str, shared_mean: bool, rows: int, cols: int, k: int,
               blocksize: int) -> tuple[int, int]:
    """``(paper, full)`` bits of one quantized block."""
    R, C = rows, cols
    split_stats = FP_BITS * (3 if shared_mean else 4)  # (1 or 2) means + 2 scales per band row
    if method == "hbllm":
        residual = 2 * R * k + 2 * (R // 2) * 4 * FP_BITS + k * index_bits(blocksize)
        if layout == "row":  # bands (R, C/2) x 2
            return R * C + R * k, 2 * R * C + 2 * R * split_stats + residual
        # col: bands (R/2, C-k) x 2
        return R * (C - k) + R * k, 2 * R * (C - k) + 2 * (R // 2) * split_stats + residual
    if method == "billm":
        salient = 2 * R * k + R * 4 * FP_BITS + k * index_bits(blocksize)
        return R * (C - k) + 2 * R * k, 2 * R * (C - k) + R * 4 * FP_BITS + salient
    if method == "sign":
        return R * C, R * C + R * 2 * FP_BITS
    raise ValueError(f"no bit accounting for method={method!r}")


def stored_bits(codes, blocksize: int) -> int:
    """Count the bits of a block's codes as stored (see module docstring); must equal
    ``block_bits(...)[1]``."""
    if isinstance(codes, SplitCodes):
        return codes.sign.numel() + codes.upper.numel() + FP_BITS * (codes.mean.numel() + codes.scale.numel())
    if isinstance(codes, Binarized):
        return codes.sign.numel() + FP_BITS * (codes.mean.numel() + codes.scale.numel())
    if isinstance(codes, (tuple, list)):
        return sum(stored_bits(c, blocksize) for c in codes)
    if isinstance(codes, dict):
        total = sum(stored_bits(v, blocksize) for key, v in codes.items() if key not in ("salient_idx", "start", "end"))
        if "salient_idx" in codes:
            total += codes["salient_idx"].numel() * index_bits(blocksize)
        return total
    raise TypeError(f"unknown code type {type(codes).__name__}")

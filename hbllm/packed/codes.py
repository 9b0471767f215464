"""The codes of one Haar-binarized linear: what the packed format stores (docs/method.md section 5).

A *band* is a matrix of binarized coefficients ``value = mean[g] + scale[g] * (+1 | -1)``; each
entry stores a sign bit and a group-membership bit ``g`` (True: the ``|x| >= t`` group), each row
its fp16 statistics for the two groups (or one shared mean and two scales).

Row layout, per block of ``blocksize`` columns: ``low``/``high`` are the column-Haar bands of the
block (rows x blocksize/2); ``sal_low``/``sal_high`` the row-Haar bands of the salient residual
(rows/2 x k). Col layout: ``low``/``high`` are the row-Haar bands of the non-salient columns
(rows/2 x (blocksize-k), in column order); the salient residual is as in the row layout.

Decoding is the quantizer's: :func:`to_quantizer` turns the codes back into
:class:`hbllm.quant.hbllm.HBLLMCodes` and :func:`dequantize` calls their ``dequantize``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import packable_shape


@dataclass
class BandCodes:
    """sign, member: bool (r, n); mean: (r, 2) or (r, 1) when shared; scale: (r, 2)."""

    sign: torch.Tensor
    member: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        r, n = self.sign.shape
        if self.member.shape != (r, n):
            raise ValueError(f"band member bits {tuple(self.member.shape)} != sign bits {(r, n)}")
        if self.scale.shape != (r, 2) or self.mean.shape not in ((r, 2), (r, 1)):
            raise ValueError(f"band stats must be mean (r,2|1), scale (r,2) with r={r}; got "
                             f"{tuple(self.mean.shape)}, {tuple(self.scale.shape)}")
        self.sign = self.sign.bool()
        self.member = self.member.bool()

    @property
    def shared_mean(self) -> bool:
        return self.mean.shape[1] == 1


@dataclass
class BlockCodes:
    """One block: ``salient`` (k,) column indices inside the block, the main bands, and the
    salient residual's row-Haar bands (None when k == 0)."""

    salient: torch.Tensor
    low: BandCodes
    high: BandCodes
    sal_low: BandCodes | None = None
    sal_high: BandCodes | None = None


@dataclass
class LinearCodes:
    """All blocks of one (rows, cols) linear. ``inverse``: the Haar inverse constant name."""

    layout: str
    rows: int
    cols: int
    blocksize: int
    inverse: str
    blocks: list[BlockCodes]

    def __post_init__(self) -> None:
        if self.layout not in ("row", "col"):
            raise ValueError(f"layout={self.layout!r} must be 'row' or 'col'")
        why = packable_shape(self.rows, self.cols, self.blocksize)
        if why:
            raise ValueError(f"the packed format cannot hold this weight: {why}")
        if len(self.blocks) != self.cols // self.blocksize:
            raise ValueError(f"{len(self.blocks)} blocks for cols={self.cols}, blocksize={self.blocksize}")


def _stacked(low: BandCodes, high: BandCodes):
    """Two bands as the quantizer's stacked :class:`~hbllm.quant.split_search.SplitCodes`
    ``(2, r, n)``: signs as -1/+1, statistics rounded to fp16 as the format stores them (a shared
    mean as two equal means)."""
    from ..quant.split_search import SplitCodes

    def stat(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float16).float().expand(-1, 2)

    sign = torch.stack((low.sign, high.sign)).to(torch.int8) * 2 - 1
    return SplitCodes(torch.stack((low.member, high.member)), sign,
                      torch.stack((stat(low.mean), stat(high.mean))),
                      torch.stack((stat(low.scale), stat(high.scale))))


def to_quantizer(codes: LinearCodes) -> list:
    """The inverse of :func:`from_quantizer`: one :class:`hbllm.quant.hbllm.HBLLMCodes` per block,
    with the statistics the format stores (fp16)."""
    from ..quant.hbllm import HBLLMCodes

    out = []
    for blk in codes.blocks:
        main = _stacked(blk.low, blk.high)
        sal = blk.salient.long().to(main.sign.device)
        if blk.sal_low is None:  # no salient column: an empty residual of rows/2 rows
            none = torch.zeros(codes.rows // 2, 0, dtype=torch.bool, device=sal.device)
            stats = torch.zeros(codes.rows // 2, 2, device=sal.device)
            residual = _stacked(BandCodes(none, none, stats, stats), BandCodes(none, none, stats, stats))
        else:
            residual = _stacked(blk.sal_low, blk.sal_high)
        out.append(HBLLMCodes(sal, main, residual, codes.layout, codes.inverse, codes.blocksize))
    return out


def dequantize(codes: LinearCodes) -> torch.Tensor:
    """The (rows, cols) float32 weight the codes stand for: each block decoded by the quantizer's
    own :meth:`hbllm.quant.hbllm.HBLLMCodes.dequantize` (the one owner of the HBLLM decode; the
    packed format owns only its bit layout, :mod:`hbllm.packed.format`, and its kernels, which the
    tests check against this)."""
    return torch.cat([blk.dequantize() for blk in to_quantizer(codes)], dim=1)


def _bands(split, h: int) -> BandCodes:
    """Band ``h`` of the quantizer's stacked ``SplitCodes`` (upper, sign, mean, scale)."""
    return BandCodes(split.sign[h] > 0, split.upper[h], split.mean[h].float(), split.scale[h].float())


def from_quantizer(blocks: list, rows: int, cols: int, blocksize: int, layout: str,
                   inverse: str) -> LinearCodes:
    """Convert ``quantize_weight(..., return_codes=True).codes`` of an HBLLM linear (a list of
    per-block :class:`hbllm.quant.hbllm.HBLLMCodes`) to :class:`LinearCodes`.

    A sign of exactly 0 (an entry equal to its group mean) is stored as ``+``; it only matters
    when the group's scale is non-zero, which the tests measure.
    """
    from ..quant.hbllm import HBLLMCodes

    out = []
    for blk in blocks:
        if not isinstance(blk, HBLLMCodes):
            raise ValueError(f"packing needs HBLLM codes; got {type(blk).__name__} -- only methods "
                             "whose registry entry says packable=True have a packed format")
        width = blk.main.sign.shape[-1] * 2 if blk.layout == "row" else blk.main.sign.shape[-1] + blk.salient.numel()
        if width != blocksize:
            raise ValueError(f"a block is {width} columns wide, not {blocksize}: the "
                             "packed format needs in_features divisible by blocksize")
        sal = blk.salient.long().cpu()
        main = type(blk.main)(*(t.cpu() for t in blk.main))
        res = type(blk.residual)(*(t.cpu() for t in blk.residual))
        sl, sh = (_bands(res, 0), _bands(res, 1)) if sal.numel() else (None, None)
        out.append(BlockCodes(sal, _bands(main, 0), _bands(main, 1), sl, sh))
    return LinearCodes(layout, rows, cols, blocksize, inverse, out)

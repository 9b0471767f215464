"""HBLLM (arXiv 2512.00862) block quantizer: FillAvg, the ``row`` and ``col`` layouts, the
salient residual (docs/method.md section 5). A block is ``w`` ``(R, C)`` with salient column indices
``sal`` ``(k,)``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bits import FP_BITS, index_bits, split_bits
from .haar import haar_forward, haar_inverse
from .saliency import select_salient
from .split_search import SplitCodes, split_binarize

FILL_WINDOW = 7
LAYOUTS = ("row", "col")
PARTITIONS = ("row", "global")
HAAR_INVERSES = ("exact", "authors")
SALIENT_METRICS = ("l2", "l1", "magnitude")
def fill_matrix(salient: torch.Tensor, window: int = FILL_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, n)``: 0/1 ``(C, C)`` matrix and counts ``(C,)`` with ``(w @ A)[:, c] / n[c]`` = FillAvg
    value of salient column c: the mean of the non-salient columns within ``window`` centred on c
    (clipped at the block edges), else the nearest non-salient column (left preferred).
    salient: bool ``(C,)`` with at least one False."""
    C = salient.numel()
    idx = torch.arange(C, device=salient.device)
    plain = ~salient
    near = ((idx[:, None] - idx[None, :]).abs() <= window // 2) & plain[:, None]
    count = near.sum(0)
    # nearest non-salient column strictly left of / right of each column (-1 / C when none)
    left = torch.where(plain, idx, -1).cummax(0).values
    left = torch.cat((left.new_full((1,), -1), left[:-1]))
    right = torch.where(plain, idx, C).flip(0).cummin(0).values.flip(0)
    right = torch.cat((right[1:], right.new_full((1,), C)))
    nearest = torch.zeros_like(near)
    nearest[torch.where(left >= 0, left, right).clamp(max=C - 1), idx] = True
    return torch.where(count > 0, near, nearest), count.clamp(min=1)


def fill_avg(w: torch.Tensor, sal: torch.Tensor) -> torch.Tensor:
    """Copy of ``w`` ``(R, C)`` whose salient columns ``sal`` are replaced by FillAvg values
    (sum / count, as a mean)."""
    salient = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
    salient[sal] = True
    pick, count = fill_matrix(salient)
    out = w.clone()
    out[:, sal] = (w @ pick[:, sal].to(w.dtype)) / count[sal].to(w.dtype)
    return out


def haar_split(x: torch.Tensor, dim: int, partition: str, shared_mean: bool, inverse: str):
    """Haar along ``dim`` of ``x`` (2-D), split-search binarize the low band, then the high band
    of what the binarized low part leaves (mathematically the high band of ``x``; computed this
    way as the authors do, which keeps exact ties in quantized weights resolved alike), inverse.
    Returns ``(reconstruction like x, SplitCodes of the stacked (low, high) bands)``."""
    low = haar_forward(x, dim)[0]
    q_low, c_low = split_binarize(low, partition, shared_mean, "rms")
    high = haar_forward(x - haar_inverse(q_low, torch.zeros_like(q_low), dim, inverse), dim)[1]
    q_high, c_high = split_binarize(high, partition, shared_mean, "rms")
    codes = SplitCodes(*(torch.cat(pair) for pair in zip(c_low, c_high)))
    return haar_inverse(q_low, q_high, dim, inverse), codes


def row_layout(w: torch.Tensor, sal: torch.Tensor, partition: str, shared_mean: bool, inverse: str):
    """``row`` layout: FillAvg, column-pair Haar of every row, split-binarize both bands, inverse;
    then the salient residual on the salient columns. Returns ``(q, main, residual)`` (SplitCodes)."""
    q, main = haar_split(fill_avg(w, sal), 1, partition, shared_mean, inverse)
    corr, residual = haar_split(w[:, sal] - q[:, sal], 0, partition, False, inverse)
    q[:, sal] += corr
    return q, main, residual


def col_layout(w: torch.Tensor, sal: torch.Tensor, partition: str, shared_mean: bool, inverse: str):
    """``col`` layout: row-pair Haar of the non-salient columns, split-binarize both bands, inverse,
    zeros on salient columns; then the salient residual (the salient weights). Returns
    ``(q, main, residual)`` (SplitCodes)."""
    plain = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    plain[sal] = False
    q = torch.zeros_like(w)
    q[:, plain], main = haar_split(w[:, plain], 0, partition, shared_mean, inverse)
    q[:, sal], residual = haar_split(w[:, sal], 0, partition, False, inverse)
    return q, main, residual


@dataclass
class HBLLMCodes:
    """One block: ``salient`` (k,) column indices; ``main`` the SplitCodes of the stacked
    (low, high) Haar bands (row layout ``(2, R, C/2)``, col layout ``(2, R/2, C-k)`` over the
    non-salient columns in order); ``residual`` those of the salient residual's row-pair bands
    ``(2, R/2, k)``; ``layout``, ``inverse`` (Haar inverse constant), ``blocksize``."""

    salient: torch.Tensor
    main: SplitCodes
    residual: SplitCodes
    layout: str
    inverse: str
    blocksize: int

    def dequantize(self) -> torch.Tensor:
        rows = self.residual.sign.shape[1] * 2
        q = self.main.dequantize()
        if self.layout == "row":
            out = haar_inverse(q[0], q[1], 1, self.inverse)
        else:
            cols = q.shape[-1] + self.salient.numel()
            out = q.new_zeros(rows, cols)
            plain = torch.ones(cols, dtype=torch.bool, device=q.device)
            plain[self.salient] = False
            out[:, plain] = haar_inverse(q[0], q[1], 0, self.inverse)
        r = self.residual.dequantize()
        out[:, self.salient] += haar_inverse(r[0], r[1], 0, self.inverse)
        return out

    def stored_bits(self) -> int:
        return (split_bits(self.main) + split_bits(self.residual)
                + self.salient.numel() * index_bits(self.blocksize))


def hbllm_block(w: torch.Tensor, d: torch.Tensor, cfg):
    """Quantize one block ``w`` ``(R, C)`` (``d`` = diag(U) of its columns). Returns ``(q, codes)``."""
    sal = select_salient(w, d, cfg.salient_metric, cfg.up_lim)
    layout = row_layout if cfg.layout == "row" else col_layout
    q, main, residual = layout(w, sal, cfg.partition, cfg.shared_mean, cfg.haar_inverse)
    return q, HBLLMCodes(sal, main, residual, cfg.layout, cfg.haar_inverse, cfg.blocksize)


def hbllm_bits(cfg, codes: HBLLMCodes) -> tuple[int, int]:
    """``(paper, full)`` bits of one block (docs/quantizers.md): paper 1 per binarized coefficient
    plus 1 per salient weight for its residual; full = signs, memberships, fp16 statistics, indices."""
    R = codes.residual.sign.shape[1] * 2
    k = codes.salient.numel()
    C = codes.main.sign.shape[-1] * (2 if cfg.layout == "row" else 1) + (0 if cfg.layout == "row" else k)
    split_stats = FP_BITS * (3 if cfg.shared_mean else 4)  # (1 or 2) means + 2 scales per band row
    residual = 2 * R * k + 2 * (R // 2) * 4 * FP_BITS + k * index_bits(cfg.blocksize)
    if cfg.layout == "row":  # bands (R, C/2) x 2
        return R * C + R * k, 2 * R * C + 2 * R * split_stats + residual
    return R * (C - k) + R * k, 2 * R * (C - k) + 2 * (R // 2) * split_stats + residual


def check_hbllm(cfg) -> None:
    for name, allowed in (("layout", LAYOUTS), ("partition", PARTITIONS),
                          ("haar_inverse", HAAR_INVERSES), ("salient_metric", SALIENT_METRICS)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"quant.{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")
    if cfg.blocksize % 2:
        raise ValueError(f"quant.blocksize={cfg.blocksize!r} must be even for HBLLM "
                         "(Haar pairs adjacent columns inside a block)")
    if not isinstance(cfg.up_lim, int) or cfg.up_lim < 2:
        raise ValueError(f"quant.up_lim={cfg.up_lim!r} must be an integer >= 2")


def check_hbllm_shape(rows: int, cols: int, cfg) -> None:
    if rows % 2:
        where = "salient residual, col layout" if cfg.layout == "col" else "salient residual"
        raise ValueError(f"HBLLM pairs adjacent rows ({where}): rows={rows} must be even")
    if cfg.layout == "row" and cols % 2:
        raise ValueError(f"HBLLM row layout pairs adjacent columns inside a block: cols={cols} must be even")


def hbllm_label(cfg) -> str:
    return f"hbllm_{cfg.layout}" + ("_shared" if cfg.shared_mean else "")

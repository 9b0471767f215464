"""HBLLM block quantizers: FillAvg, the ``row`` and ``col`` layouts, the salient residual
(METHOD.md section 5). A block is ``w`` ``(R, C)`` with salient column indices ``sal`` ``(k,)``."""
from __future__ import annotations

import torch

from .haar import haar_forward, haar_inverse
from .split_search import SplitCodes, split_binarize

FILL_WINDOW = 7


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
    then the salient residual on the salient columns. Returns ``(q, codes)``."""
    q, main = haar_split(fill_avg(w, sal), 1, partition, shared_mean, inverse)
    corr, residual = haar_split(w[:, sal] - q[:, sal], 0, partition, False, inverse)
    q[:, sal] += corr
    return q, {"main": main, "residual": residual}


def col_layout(w: torch.Tensor, sal: torch.Tensor, partition: str, shared_mean: bool, inverse: str):
    """``col`` layout: row-pair Haar of the non-salient columns, split-binarize both bands, inverse,
    zeros on salient columns; then the salient residual (the salient weights). Returns ``(q, codes)``."""
    plain = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    plain[sal] = False
    q = torch.zeros_like(w)
    q[:, plain], main = haar_split(w[:, plain], 0, partition, shared_mean, inverse)
    q[:, sal], residual = haar_split(w[:, sal], 0, partition, False, inverse)
    return q, {"main": main, "residual": residual}

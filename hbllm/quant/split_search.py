"""Optimal magnitude split of a band into two groups, each binarized (docs/method.md section 4).

Batched over bands, rows and thresholds, with no (rows x thresholds x cols) temporary: each row is
sorted once by value; a group and the part of a group above its mean are value intervals, so every
candidate's counts, means, variances and ``sum |x - m|`` come from float64 prefix sums and binary
searches, O(R T log C). The chosen split is then binarized directly in float32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .binarize import binarize

LEVELS = {"row": 41, "global": 81}
DIRECT_CHUNK_ELEMS = 1 << 23  # (rows, thresholds, cols) elements per direct re-evaluation chunk


class SplitCodes(NamedTuple):
    """What a packed checkpoint stores for one split band ``x`` of shape ``(B, R, C)``.

    upper: bool ``(B, R, C)``, membership (``|x| >= t``); sign: int8 ``(B, R, C)`` in {-1, 0, 1};
    mean: ``(B, R, 2)`` (low, upper group) or ``(B, R, 1)`` (shared mean); scale: ``(B, R, 2)``.
    """

    upper: torch.Tensor
    sign: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        idx = self.upper.long()
        mean = self.mean if self.mean.shape[-1] == 1 else self.mean.gather(-1, idx)
        return self.sign.to(self.scale.dtype) * self.scale.gather(-1, idx) + mean


def quantile_levels(partition: str, device=None) -> torch.Tensor:
    """The candidate quantile levels: 41 (row) or 81 (global) evenly spaced in [0.10, 0.90]."""
    return torch.linspace(0.10, 0.90, LEVELS[partition], device=device)


def sorted_quantiles(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantiles of ``s`` (sorted ascending along the last dim, ``(..., n)``) at levels ``q`` ``(T,)``
    with linear interpolation, as ``torch.quantile``'s default. Returns ``(..., T)``."""
    ranks = q * (s.shape[-1] - 1)
    below, above = ranks.floor().long(), ranks.ceil().long()
    weight = (ranks - below).expand(*s.shape[:-1], -1)
    return torch.lerp(s[..., below], s[..., above], weight)


def _group_error(var, absdev, n, scale: str) -> torch.Tensor:
    """Squared error of a group binarized as ``sign(x-c)*a + c`` from ``var = sum (x-c)^2``,
    ``absdev = sum |x-c|`` and its size n, counting every entry as ``x != c``:
    ``2 var - 2 a absdev`` with ``a = sqrt(var/n)`` (rms), ``var - absdev^2/n`` with ``a = absdev/n`` (abs)."""
    n = n.clamp(min=1)
    a = (var / n).sqrt() if scale == "rms" else absdev / n
    return var - 2 * a * absdev + a * a * n


def _prefix(v: torch.Tensor) -> torch.Tensor:
    """Float64 prefix sums with a leading 0 along the last dim: ``(..., n+1)``."""
    v = v.double()
    return torch.cat((v.new_zeros(*v.shape[:-1], 1), v.cumsum(-1)), -1)


class _SortedRows:
    """Rows ``(B, R, C)`` sorted by value with float64 prefix sums of x and x^2, for counts and
    sums over value intervals."""

    def __init__(self, x: torch.Tensor):
        self.values = x.sort(-1).values.double()
        self.p1, self.p2 = _prefix(self.values), _prefix(self.values.square())
        self.n = x.shape[-1]
        inf = self.values.new_full((*x.shape[:-1], 1), float("inf"))
        self.padded = torch.cat((-inf, self.values, inf), -1)

    def near(self, v: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Whether an entry lies within a few float32 ulps of ``v``, given ``i`` = count ``<= v``."""
        tol = v.abs() * 2.0 ** -20 + 1e-30
        return ((v - self.padded.gather(-1, i)) <= tol) | ((self.padded.gather(-1, i + 1) - v) <= tol)

    def below(self, v: torch.Tensor, inclusive: bool):
        """Count, sum and sum of squares of the entries ``< v`` (``<= v`` when inclusive)."""
        i = torch.searchsorted(self.values, v.contiguous(), right=inclusive)
        return i.double(), self.p1.gather(-1, i), self.p2.gather(-1, i)


def split_errors(x: torch.Tensor, thr: torch.Tensor, scale: str, shared_mean: bool) -> torch.Tensor:
    """Per-row squared error ``(B, R, T)`` (float64) of every candidate split of ``x`` ``(B, R, C)``
    at thresholds ``thr`` ``(B, R, T)``: groups ``-t < x < t`` and the rest, each binarized
    around its own mean (or the row mean when ``shared_mean``) with scale ``rms`` or ``abs``.

    A group's ``sum |x - c| = 2 sum_{x > c} (x - c) - sum (x - c)``; the entries of each group above
    its centre form at most two value intervals, so everything is prefix sums and binary searches."""
    rows = _SortedRows(x)
    n, tot1, tot2 = rows.n, rows.p1[..., -1:], rows.p2[..., -1:]
    t = thr.double()
    pos = t > 0  # t == 0: empty low group, and the upper group's negative part is x < 0
    c_t, s_t, q_t = rows.below(t, False)  # x < t
    c_n, s_n, q_n = rows.below(-t, True)  # x <= -t
    if not bool(pos.all()):
        c_z, s_z, q_z = rows.below(-t, False)
        c_n, s_n, q_n = (torch.where(pos, a, b) for a, b in ((c_n, c_z), (s_n, s_z), (q_n, q_z)))
    n_lo = (c_t - c_n) * pos
    sum_lo, sq_lo = (s_t - s_n) * pos, (q_t - q_n) * pos
    n_up, sum_up, sq_up = n - n_lo, tot1 - sum_lo, tot2 - sq_lo
    if shared_mean:
        m_lo = m_up = (tot1 / n).expand_as(t)
    else:
        m_lo, m_up = sum_lo / n_lo.clamp(min=1), sum_up / n_up.clamp(min=1)
    # entries above the centre: low group max(m_lo, -t) < x < t
    i_lo = torch.searchsorted(rows.values, m_lo.contiguous(), right=True)
    use = m_lo >= -t
    c_a = torch.where(use, i_lo.double(), c_n)
    s_a = torch.where(use, rows.p1.gather(-1, i_lo), s_n)
    c_above_lo = (c_t - c_a).clamp(min=0)
    s_above_lo = (s_t - s_a) * (c_above_lo > 0)
    # upper group: x >= t and x > m_up, plus m_up < x <= -t (x < 0 when t == 0)
    i_up = torch.searchsorted(rows.values, m_up.contiguous(), right=True)
    c_m, s_m = i_up.double(), rows.p1.gather(-1, i_up)
    hi = m_up >= t
    c_above_up = n - torch.where(hi, c_m, c_t)
    s_above_up = tot1 - torch.where(hi, s_m, s_t)
    c_neg = (c_n - c_m).clamp(min=0)
    c_above_up = c_above_up + c_neg
    s_above_up = s_above_up + (s_n - s_m) * (c_neg > 0)
    abs_lo = 2 * (s_above_lo - c_above_lo * m_lo) - (sum_lo - n_lo * m_lo)
    abs_up = 2 * (s_above_up - c_above_up * m_up) - (sum_up - n_up * m_up)
    var_lo = (sq_lo - 2 * m_lo * sum_lo + n_lo * m_lo * m_lo).clamp(min=0)
    var_up = (sq_up - 2 * m_up * sum_up + n_up * m_up * m_up).clamp(min=0)
    err = _group_error(var_lo, abs_lo, n_lo, scale) + _group_error(var_up, abs_up, n_up, scale)
    # An entry equal to its group's centre keeps sign 0 (no scale error), which the formula above
    # ignores; whether it is equal depends on float32 rounding of the mean. Rows with an entry
    # within a few ulps of a candidate's centre are re-evaluated directly in float32.
    ambiguous = (rows.near(m_lo, i_lo) | rows.near(m_up, i_up)).any(-1)
    if bool(ambiguous.any()):
        xa, ta = x[ambiguous], thr[ambiguous]
        step = max(1, DIRECT_CHUNK_ELEMS // (ta.shape[-1] * x.shape[-1]))
        err[ambiguous] = torch.cat([_direct_errors(xc, tc, scale, shared_mean)
                                    for xc, tc in zip(xa.split(step), ta.split(step))])
    return err


def _direct_errors(x: torch.Tensor, thr: torch.Tensor, scale: str, shared_mean: bool) -> torch.Tensor:
    """Errors ``(N, T)`` of every split of rows ``x`` ``(N, C)`` at ``thr`` ``(N, T)``, computed
    directly in float32 as the binarizers do (``(N, T, C)`` temporaries; used for few rows)."""
    xx = x[:, None, :].expand(-1, thr.shape[-1], -1)
    low = xx.abs() < thr[..., None]
    mean = x.mean(-1, keepdim=True)[:, None, :].expand(-1, thr.shape[-1], 1) if shared_mean else None
    q = binarize(xx, low, scale, mean).q + binarize(xx, ~low, scale, mean).q
    return (xx - q).square().sum(-1).double()


def split_binarize(x: torch.Tensor, partition: str = "row", shared_mean: bool = False,
                   scale: str = "rms") -> tuple[torch.Tensor, SplitCodes]:
    """Binarize ``x`` ``(B, R, C)`` (or ``(R, C)``) with the best two-group magnitude split.

    partition ``row``: each row picks its threshold among its 41 quantiles of ``|x|``;
    ``global``: one threshold per band among 81 quantiles of all its ``|x|``, by total error.
    Groups: ``|x| < t`` and ``|x| >= t``, each B1 (``scale`` rms or abs), with the row mean of the
    band shared by both groups when ``shared_mean``. Returns ``(q, codes)``, q like ``x``.
    """
    if partition not in LEVELS:
        raise ValueError(f"partition={partition!r} is not one of {list(LEVELS)}")
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    B, R, C = x.shape
    ax = x.abs()
    levels = quantile_levels(partition, x.device)
    if partition == "row":
        thr = sorted_quantiles(ax.sort(-1).values, levels)
    else:
        thr = sorted_quantiles(ax.reshape(B, R * C).sort(-1).values, levels)
        thr = thr[:, None, :].expand(B, R, -1).contiguous()
    err = split_errors(x, thr, scale, shared_mean)
    if partition == "row":
        best = err.argmin(-1, keepdim=True)
    else:
        best = err.sum(1).argmin(-1).view(B, 1, 1).expand(B, R, 1)
    upper = ax >= thr.gather(-1, best)
    mean = x.mean(-1, keepdim=True) if shared_mean else None
    lo = binarize(x, ~upper, scale, mean)
    up = binarize(x, upper, scale, mean)
    q = lo.q + up.q
    codes = SplitCodes(upper, (lo.sign + up.sign).to(torch.int8),
                       mean if shared_mean else torch.cat((lo.mean, up.mean), -1),
                       torch.cat((lo.scale, up.scale), -1))
    return (q[0] if squeeze else q), codes

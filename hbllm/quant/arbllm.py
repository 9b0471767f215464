"""ARB-LLM block quantizer (arXiv 2410.03129; docs/arbllm.md): ARB-LLM_X and ARB-LLM_RC.

Per GPTQ block ``w`` ``(R, C)``: salient columns as BiLLM (``l1`` score on ``T = W^2/d^2``, k search);
the column-group bitmap (CGB) splits the salient entries by one threshold on ``T`` into two groups
(2nd order each) and the other entries by one threshold on ``T`` into two groups (1st order each).
Each group is binarized by alternating refined binarization, row-wise over its masked entries:

- ``x``: ``q = mu + sum_p alpha_p b_p``; ARB alternates the exact minimizers of ``||w - q||^2`` over
  mu, alpha(s) and the signs; then, signs fixed, mu and alpha(s) alternate the minimizers of the
  calibration-weighted error ``(w - q) S (w - q)^T`` (``S`` the block of ``X^T X``).
- ``rc``: ``q = sum_p (alpha_r,p alpha_c,p^T) * b_p`` (no mean), row and column scales alternating
  (and, for 2nd order, the signs jointly from the four candidates).

Everything is batched over rows, groups and split thresholds; only the few iterations loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .binarize import binarize, binarize2
from .bits import FP_BITS, index_bits
from .registry import at_defaults
from .saliency import chunk_elems, select_salient
from .split_search import sorted_quantiles, split_errors

VARIANTS = ("x", "rc")
SPLIT_ON = ("t", "w")  # what the CGB split searches run on: T = w^2/d^2 (authors) or w
ITERS = 15  # the authors' ARB iterations and ARB-X refinement iterations
LEVELS = torch.linspace(0.10, 0.90, 81)  # split threshold candidates: quantiles of |T|
EPS_ARB, EPS_X = 1e-8, 1e-10  # the authors' denominator guards


class ArbCodes(NamedTuple):
    """What a packed checkpoint stores for one block with k salient and n = C - k plain columns.

    sal_upper: bool ``(R, k)``, salient entry in the upper group (CGB), None without CGB;
    sal_sign: int8 ``(2, R, k)``, the two sign planes of the salient entries;
    upper: bool ``(R, n)``, plain entry in the upper group; sign: int8 ``(R, n)``;
    x: sal_row ``(G, R, 3)`` = (mean, alpha_0, alpha_1) per salient group (G = 2, or 1 without CGB),
    row ``(2, R, 2)`` = (mean, alpha) per plain group, sal_col = col = None;
    rc: sal_row ``(G, R, 2)`` row scales of the two planes, sal_col ``(G, 2, k)`` their column
    scales, row ``(2, R, 1)``, col ``(2, n)``.
    """

    sal_upper: torch.Tensor | None
    sal_sign: torch.Tensor
    upper: torch.Tensor
    sign: torch.Tensor
    sal_row: torch.Tensor
    row: torch.Tensor
    sal_col: torch.Tensor | None = None
    col: torch.Tensor | None = None

    def dequantize(self, sal: torch.Tensor, cols: int) -> torch.Tensor:
        """The block ``(R, cols)`` with salient columns ``sal`` ``(k,)``."""
        R = self.sign.shape[0]
        out = self.sal_row.new_zeros(R, cols)
        plain = torch.ones(cols, dtype=torch.bool, device=out.device)
        plain[sal] = False
        gs = (self.sal_upper.long() if self.sal_upper is not None
              else torch.zeros_like(self.sal_sign[0], dtype=torch.long))
        g = self.upper.long()
        b0, b1 = self.sal_sign.to(out.dtype)
        s = self.sign.to(out.dtype)
        if self.sal_col is None:  # x
            mean, a0, a1 = (self.sal_row[..., i].T.gather(1, gs) for i in range(3))
            out[:, sal] = mean + a0 * b0 + a1 * b1
            out[:, plain] = self.row[..., 0].T.gather(1, g) + self.row[..., 1].T.gather(1, g) * s
        else:  # rc: sal_row (G, R, 2), sal_col (G, 2, k)
            c0 = (self.sal_row[..., 0, None] * self.sal_col[:, 0, None, :]).gather(0, gs[None])[0]
            c1 = (self.sal_row[..., 1, None] * self.sal_col[:, 1, None, :]).gather(0, gs[None])[0]
            out[:, sal] = c0 * b0 + c1 * b1
            out[:, plain] = (self.row * self.col[:, None, :]).gather(0, g[None])[0] * s
        return out

    def stored_bits(self, blocksize: int) -> int:
        """Bits as stored: sign planes, CGB membership bits, salient indices, fp16 statistics."""
        k = self.sal_sign.shape[-1]
        stats = sum(t.numel() for t in (self.sal_row, self.row, self.sal_col, self.col) if t is not None)
        member = self.upper.numel() + (self.sal_upper.numel() if self.sal_upper is not None else 0)
        return (self.sal_sign.numel() + self.sign.numel() + member + k * index_bits(blocksize)
                + FP_BITS * stats)


def arb_bits(variant: str, rows: int, cols: int, k: int, blocksize: int, cgb: bool = True) -> tuple[int, int]:
    """``(paper, full)`` bits of one block of ``rows x cols`` with ``k`` salient columns.

    paper: 1 bit per plain weight, 2 per salient weight (as BiLLM). full: the paper's signs, one
    CGB membership bit per plain weight (and per salient weight with CGB), ``index_bits`` per salient
    column, and fp16 statistics: x 2 x (mean, alpha) per plain group and G x (mean, alpha_0, alpha_1)
    per salient group, per row; rc per group a row scale per row and a column scale per column of
    the group's columns, two planes for the salient groups."""
    R, n, G = rows, cols - k, 2 if cgb else 1
    paper = R * n + 2 * R * k
    member = R * n + (R * k if cgb else 0)
    if variant == "x":
        stats = 2 * 2 * R + G * 3 * R
    elif variant == "rc":
        stats = 2 * (R + n) + G * 2 * (R + k)
    else:
        raise ValueError(f"ARB-LLM variant={variant!r} is not one of {list(VARIANTS)}")
    return paper, paper + member + k * index_bits(blocksize) + FP_BITS * stats


# ----------------------------------------------------------------------------------------------
# Alternating refined binarizers. x: (G, R, n) values, m: (G, R, n) 0/1 masks; statistics per
# (group, row) over the masked entries; sign planes are returned masked.

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.sum(-1, keepdim=True)


def _cols(t: torch.Tensor) -> torch.Tensor:
    return t.sum(-2, keepdim=True)


def _signs(idx: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Planes of the candidate index over (-,-), (-,+), (+,-), (+,+) (argmin ties: the first)."""
    one = torch.ones_like(m)
    return torch.where(idx < 2, -one, one) * m, torch.where(idx % 2 == 0, -one, one) * m


def arb1(x: torch.Tensor, m: torch.Tensor, iters: int = ITERS):
    """1st-order ARB: ``q = mu + alpha b``. Starts from B1_abs; each iteration sets mu to the mean
    residual correction, alpha to ``<b, x - mu> / <b, b>``, b to ``sign(x - mu)``. Returns
    ``(mu (G,R,1), alpha (G,R,1), b (G,R,n))``."""
    xm = x * m
    cnt = _rows(m).clamp(min=1)
    mu = _rows(xm) / cnt
    alpha = _rows((xm - mu * m).abs()) / cnt
    b = torch.sign(xm - mu * m)
    for _ in range(iters):
        mu = mu + _rows(xm - (alpha * b + mu) * m) / cnt
        alpha = _rows(b * (xm - mu * m)) / (_rows(b * b) + EPS_ARB)
        b = torch.sign(xm - mu * m)
    return mu, alpha, b


def arb2(x: torch.Tensor, m: torch.Tensor, iters: int = ITERS):
    """2nd-order ARB: ``q = mu + alpha_0 b_0 + alpha_1 b_1`` with one refined mean. Starts from B2
    (mu = sum of both means); each iteration updates mu, alpha_0, alpha_1 (exact minimizers, in
    turn) and both sign planes jointly (nearest of the four values). Returns
    ``(mu, (alpha_0, alpha_1), (b_0, b_1))``."""
    xm = x * m
    cnt = _rows(m).clamp(min=1)
    approx, mu, alphas, planes = torch.zeros_like(xm), 0.0, [], []
    for _ in range(2):
        res = xm - approx
        mean = _rows(res) / cnt
        d = (res - mean) * m
        a = _rows(d.abs()) / cnt
        b = torch.sign(d)
        approx = approx + (a * b + mean) * m
        mu, alphas, planes = mu + mean, alphas + [a], planes + [b]
    a0, a1 = alphas
    b0, b1 = planes
    for _ in range(iters):
        mu = mu + _rows(xm - (a0 * b0 + a1 * b1 + mu) * m) / cnt
        t = xm - mu * m
        a0 = _rows(b0 * (t - a1 * b1)) / (_rows(b0 * b0) + EPS_ARB)
        a1 = _rows(b1 * (t - a0 * b0)) / (_rows(b1 * b1) + EPS_ARB)
        cand = torch.stack([(t - v).abs() for v in (-a0 - a1, -a0 + a1, a0 - a1, a0 + a1)], -1)
        b0, b1 = _signs(cand.argmin(-1), m)
    return mu, (a0, a1), (b0, b1)


def refine_x(x: torch.Tensor, m: torch.Tensor, mu: torch.Tensor, alphas, planes, S: torch.Tensor,
             iters: int = ITERS):
    """ARB-X: signs fixed, alternate mu and each alpha_p as the exact minimizers of the
    calibration-weighted error ``e S e^T`` per row, ``e = x - mu - sum_p alpha_p b_p`` on the mask
    (``S`` ``(n, n)``). Returns ``(mu, alphas)``."""
    xm = x * m
    mS = m @ S
    den_mu = _rows(mS * m) + EPS_X
    bS = [b @ S for b in planes]
    den = [_rows(s * b) + EPS_X for s, b in zip(bS, planes)]
    x_m = _rows((xm @ S) * m)
    b_m = [_rows(s * m) for s in bS]
    b_x = [_rows(s * xm) for s in bS]
    b_b = [[_rows(s * b) for b in planes] for s in bS]
    alphas = list(alphas)
    P = len(planes)
    for _ in range(iters):
        mu = (x_m - sum(alphas[p] * b_m[p] for p in range(P))) / den_mu
        for p in range(P):
            others = sum(alphas[q] * b_b[p][q] for q in range(P) if q != p)
            alphas[p] = (b_x[p] - mu * b_m[p] - others) / den[p]
    return mu, tuple(alphas)


def _rc_start(res: torch.Tensor, m: torch.Tensor):
    """RC initial scales of a masked residual: row ``mean|res|``, column ``mean|res / row|``
    over rows with a nonzero row scale; signs ``sign(res)``."""
    ar = _rows(res.abs()) / _rows(m).clamp(min=1)
    valid = m * (ar > 0)
    ac = _cols((res / torch.where(ar > 0, ar, torch.ones_like(ar))).abs() * valid) / _cols(valid).clamp(min=1)
    return ar, ac, torch.sign(res) * m


def _rc_scales(target: torch.Tensor, ar: torch.Tensor, ac: torch.Tensor, b: torch.Tensor):
    """Row scale then column scale of ``ar ac^T * b`` fitted to ``target`` (exact minimizers)."""
    cb = ac * b
    ar = _rows(cb * target) / (_rows(cb * cb) + EPS_ARB)
    rb = ar * b
    ac = _cols(rb * target) / (_cols(rb * rb) + EPS_ARB)
    return ar, ac


def rc1(x: torch.Tensor, m: torch.Tensor, iters: int = ITERS):
    """1st-order ARB-RC: ``q = (alpha_r alpha_c^T) * sign(x)``, row and column scales alternating.
    Returns ``(alpha_r (G,R,1), alpha_c (G,1,n), b)``."""
    xm = x * m
    ar, ac, b = _rc_start(xm, m)
    for _ in range(iters):
        ar, ac = _rc_scales(xm, ar, ac, b)
    return ar, ac, b


def rc2(x: torch.Tensor, m: torch.Tensor, iters: int = ITERS):
    """2nd-order ARB-RC: ``q = sum_p (alpha_r,p alpha_c,p^T) * b_p``; each iteration refits plane 0's
    scales against ``x - plane 1``, then plane 1's against ``x - plane 0``, then both sign planes
    jointly (nearest of the four values). Returns ``((ar0, ar1), (ac0, ac1), (b0, b1))``."""
    xm = x * m
    ar0, ac0, b0 = _rc_start(xm, m)
    ar1, ac1, b1 = _rc_start(xm - ar0 * ac0 * b0, m)
    for _ in range(iters):
        ar0, ac0 = _rc_scales(xm - ar1 * ac1 * b1, ar0, ac0, b0)
        ar1, ac1 = _rc_scales(xm - ar0 * ac0 * b0, ar1, ac1, b1)
        c0, c1 = ar0 * ac0, ar1 * ac1
        cand = torch.stack([(xm - v).abs() for v in (-c0 - c1, -c0 + c1, c0 - c1, c0 + c1)], -1)
        b0, b1 = _signs(cand.argmin(-1), m)
    return (ar0, ar1), (ac0, ac1), (b0, b1)


# ----------------------------------------------------------------------------------------------
# Column-group bitmap: the two split searches, on T.

def _thresholds(values: torch.Tensor) -> torch.Tensor:
    """The 81 candidate thresholds: quantiles 0.10 .. 0.90 of a flat tensor (linear interpolation)."""
    return sorted_quantiles(values.sort().values, LEVELS.to(values.device, values.dtype))


def _chunks(n_thr: int, per_thr: int, device) -> int:
    return max(1, min(n_thr, chunk_elems(device) // max(1, per_thr)))


def salient_split(ts: torch.Tensor) -> torch.Tensor:
    """CGB split of the salient entries ``ts`` ``(R, k)`` of T: the threshold among the quantiles
    of its nonzero |values| whose two groups (``|t| < thr``, ``|t| >= thr``), each B2, give the
    least squared error. Returns the upper-group mask ``(R, k)``."""
    a = ts.abs()
    nonzero = a[a != 0]
    if nonzero.numel() == 0:
        return torch.zeros_like(a, dtype=torch.bool)
    thr = _thresholds(nonzero)
    errs = []
    for t in thr.split(_chunks(len(thr), a.numel() * 8, a.device)):
        low = a[None] < t[:, None, None]
        x = ts[None].expand_as(low)
        q = sum(b.q for b in binarize2(x, low)) + sum(b.q for b in binarize2(x, ~low))
        errs.append((x - q).square().sum((1, 2)))
    return a >= thr[int(torch.cat(errs).argmin())]


def plain_split(t: torch.Tensor, sal: torch.Tensor, S: torch.Tensor | None = None,
                iters: int = ITERS) -> torch.Tensor:
    """Split of the non-salient entries of T ``(R, C)`` (salient columns ``sal``): the threshold
    among the quantiles of ``|T|`` over the whole block with the salient entries as zeros, whose two
    groups, each B1_abs, give the least error: squared (``S`` None) or, with ``S`` ``(C, C)``, the
    calibration-weighted ``sum_rows e S e^T`` of the block error, whose salient part is 2nd-order
    ARB of T on all salient entries. Returns the upper-group mask of the plain columns ``(R, n)``."""
    R, C = t.shape
    plain = torch.ones(C, dtype=torch.bool, device=t.device)
    plain[sal] = False
    tn = t[:, plain]
    flat = torch.cat((t.new_zeros(R * sal.numel()), tn.abs().flatten()))
    thr = _thresholds(flat)
    if S is None:
        err = split_errors(tn[None], thr.expand(1, R, -1).contiguous(), "abs", False)[0].sum(0)
        return tn.abs() >= thr[int(err.argmin())]
    ts = t[:, sal]
    mu, alphas, planes = arb2(ts[None], torch.ones_like(ts)[None], iters)
    es = (ts - (mu + alphas[0] * planes[0] + alphas[1] * planes[1])[0])
    lin = 2 * es @ S[sal][:, plain]
    Snn = S[plain][:, plain]
    errs = []
    a = tn.abs()
    for th in thr.split(_chunks(len(thr), tn.numel() * 6, t.device)):
        low = a[None] < th[:, None, None]
        x = tn[None].expand_as(low)
        e = x - binarize(x, low, "abs").q - binarize(x, ~low, "abs").q
        errs.append((e * (e @ Snn + lin)).sum((1, 2)))
    return a >= thr[int(torch.cat(errs).argmin())]


# ----------------------------------------------------------------------------------------------

def arb_block(w: torch.Tensor, d: torch.Tensor, variant: str, S: torch.Tensor | None = None,
              up_lim: int = 50, salient_metric: str = "l1", iters: int = ITERS,
              x_iters: int = ITERS, cgb: bool = True, split_on: str = "t"):
    """Quantize one GPTQ block ``w`` ``(R, C)`` given ``d = diag(U)`` of its columns ``(C,)``.

    variant ``x`` needs ``S`` ``(C, C)``: the block's part of the calibration Hessian (any positive
    multiple of ``X^T X``, undamped). ``cgb=False`` keeps the salient entries in one group.
    ``split_on``: ``t`` searches both CGB splits on ``T = w^2/d^2`` (the authors' ``hessian``
    setting), ``w`` on ``w`` itself (as our ``billm`` does; an ablation).
    Returns ``(q (R, C), salient indices (k,), ArbCodes)``."""
    if variant not in VARIANTS:
        raise ValueError(f"ARB-LLM variant={variant!r} is not one of {list(VARIANTS)}")
    if split_on not in SPLIT_ON:
        raise ValueError(f"ARB-LLM split_on={split_on!r} is not one of {list(SPLIT_ON)}")
    if variant == "x" and S is None:
        raise ValueError("ARB-LLM_X needs the block of the calibration Hessian S (C, C)")
    R, C = w.shape
    sal = select_salient(w, d, salient_metric, up_lim)
    plain = torch.ones(C, dtype=torch.bool, device=w.device)
    plain[sal] = False
    t = w.square() / d.square()[None, :] if split_on == "t" else w
    sal_upper = salient_split(t[:, sal]) if cgb else None
    upper = plain_split(t, sal, S if variant == "x" else None, iters)
    ws, wn = w[:, sal], w[:, plain]
    ms = (torch.stack((~sal_upper, sal_upper)) if cgb else torch.ones_like(ws, dtype=torch.bool)[None]).to(w.dtype)
    mn = torch.stack((~upper, upper)).to(w.dtype)
    xs, xn = ws[None].expand_as(ms), wn[None].expand_as(mn)
    if variant == "x":
        mu_s, a_s, b_s = arb2(xs, ms, iters)
        mu_s, a_s = refine_x(xs, ms, mu_s, a_s, b_s, S[sal][:, sal], x_iters)
        mu_n, a_n, b_n = arb1(xn, mn, iters)
        mu_n, (a_n,) = refine_x(xn, mn, mu_n, (a_n,), (b_n,), S[plain][:, plain], x_iters)
        qs = (mu_s * ms + a_s[0] * b_s[0] + a_s[1] * b_s[1]).sum(0)
        qn = (mu_n * mn + a_n * b_n).sum(0)
        sal_row, row, sal_col, col = torch.cat((mu_s, *a_s), -1), torch.cat((mu_n, a_n), -1), None, None
    else:
        ar_s, ac_s, b_s = rc2(xs, ms, iters)
        ar_n, ac_n, b_n = rc1(xn, mn, iters)
        qs = (ar_s[0] * ac_s[0] * b_s[0] + ar_s[1] * ac_s[1] * b_s[1]).sum(0)
        qn = (ar_n * ac_n * b_n).sum(0)
        sal_row, row = torch.cat(ar_s, -1), ar_n
        sal_col, col = torch.cat(ac_s, -2), ac_n[:, 0, :]
    q = torch.empty_like(w)
    q[:, sal], q[:, plain] = qs, qn
    codes = ArbCodes(sal_upper, torch.stack([b.sum(0) for b in b_s]).to(torch.int8), upper,
                     b_n.sum(0).to(torch.int8), sal_row, row, sal_col, col)
    return q, sal, codes


# ----------------------------------------------------------------------------------------------
# The registry's methods arbllm_x and arbllm_rc (hbllm/quant/methods.py).

SALIENT_METRICS = ("l2", "l1", "magnitude")


@dataclass
class ArbBlockCodes:
    """One block's codes for the registry: ``salient`` (k,) column indices, ``arb`` the
    :class:`ArbCodes`, ``cols`` the block width, ``blocksize`` (for the index bits)."""

    salient: torch.Tensor
    arb: ArbCodes
    cols: int
    blocksize: int

    def dequantize(self) -> torch.Tensor:
        return self.arb.dequantize(self.salient, self.cols)

    def stored_bits(self) -> int:
        return self.arb.stored_bits(self.blocksize)


def arbllm_block(variant: str):
    """The block quantizer of ARB-LLM ``variant``: ``(w (R, C), d (C,), cfg, S (C, C)) -> (q,
    codes)`` with ``S`` the block's slice of the undamped Hessian (used by ``x`` only). The block is
    quantized divided by ``2^floor(log2 max|w|)`` (exact) and its per-row statistics multiplied
    back, so the authors' absolute denominator guards (``EPS_ARB``) act at unit scale and the
    result is exactly equivariant to power-of-two scales of the weight (ARB-RC's column-scale
    update divides by sums of squared row scales, which the guard swamps for |w| ~ 1e-5)."""

    def block(w: torch.Tensor, d: torch.Tensor, cfg, S: torch.Tensor):
        x_iters = cfg.arb_x_iters if variant == "x" else ITERS
        exp = torch.floor(torch.log2(w.abs().amax()))
        s = torch.where(torch.isfinite(exp), torch.exp2(exp), torch.ones_like(exp))
        _, sal, codes = arb_block(w / s, d, variant, S if variant == "x" else None, cfg.up_lim,
                                  cfg.salient_metric, cfg.arb_iters, x_iters, cfg.cgb,
                                  cfg.arb_split_on)
        codes = codes._replace(sal_row=codes.sal_row * s, row=codes.row * s)
        out = ArbBlockCodes(sal, codes, w.shape[1], cfg.blocksize)
        return out.dequantize(), out

    return block


def arbllm_bits(variant: str):
    """``(cfg, codes) -> (paper, full)`` bits of one block by :func:`arb_bits`."""

    def bits(cfg, codes: ArbBlockCodes) -> tuple[int, int]:
        return arb_bits(variant, codes.arb.sign.shape[0], codes.cols, codes.salient.numel(),
                        cfg.blocksize, cfg.cgb)

    return bits


def arbllm_label(cfg) -> str:
    """``arbllm_x`` / ``arbllm_rc`` at the defaults, else with ``_nocgb``, ``_splitw``,
    ``_i<iters>``, ``_xi<x iters>``, ``_<salient metric>`` for the fields that differ."""
    if at_defaults(cfg):
        return cfg.method
    return (cfg.method + ("" if cfg.cgb else "_nocgb")
            + ("_splitw" if cfg.arb_split_on == "w" else "")
            + (f"_i{cfg.arb_iters}" if cfg.arb_iters != ITERS else "")
            + (f"_xi{cfg.arb_x_iters}" if cfg.arb_x_iters not in (None, ITERS) else "")
            + (f"_{cfg.salient_metric}" if cfg.salient_metric != "l1" else ""))


def check_arbllm(cfg) -> None:
    if cfg.salient_metric not in SALIENT_METRICS:
        raise ValueError(f"quant.salient_metric={cfg.salient_metric!r} is not one of "
                         f"{list(SALIENT_METRICS)}")
    if not isinstance(cfg.up_lim, int) or cfg.up_lim < 2:
        raise ValueError(f"quant.up_lim={cfg.up_lim!r} must be an integer >= 2")
    for name in ("arb_iters", "arb_x_iters"):
        value = getattr(cfg, name)
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 0
        if value is not None and bad:
            raise ValueError(f"quant.{name}={value!r} must be an integer >= 0")
    if not isinstance(cfg.cgb, bool):
        raise ValueError(f"quant.cgb={cfg.cgb!r} must be true or false")
    if cfg.arb_split_on not in SPLIT_ON:
        raise ValueError(f"quant.arb_split_on={cfg.arb_split_on!r} is not one of {list(SPLIT_ON)}")

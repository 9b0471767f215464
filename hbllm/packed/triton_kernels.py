"""Triton kernels for packed linears (CUDA only; this module imports triton).

Bands are processed in chunks of ``CW`` int32 words per row as 3-D tiles (rows, CW, 32): bit
``t`` of word ``w`` is one coefficient, dequantized by two bit tests and three selects among the
per-(row, group) values ``mean +- scale``. The GEMV keeps a 3-D accumulator and reduces it once
at the end (a per-chunk reduction over the 32 bit lanes cost more than the dequantization).

* :func:`row_gemv` -- row layout, few tokens: forms the Haar pair sums/differences of x, the
  main bands, and the salient residual with its row-pair inverse, all in one launch.
* :func:`row_mm` -- row layout, any number of tokens: the same fused computation with fp16
  tiles fed to ``tl.dot``, split over ``split`` programs along the input dimension.
* :func:`band_mm` -- ``out = z @ band^T`` for a precomputed input ``z`` (col layout).
Buffers are the tiled ones of :func:`hbllm.packed.runtime.build_runtime`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile configs, best of the sweeps of scripts/bench_kernel.py --tune on an H100 (RESULTS.md).
GEMV_CONFIG = {"br": 4, "cw": 16, "num_warps": 4}
MM_CONFIG = {"bn": 16, "br": 64, "cw": 4, "split": 8, "num_warps": 4}


@triton.jit
def _values(s_ptr, m_ptr, g_ptr, st_ptr, tile, lane, rmask, w0, nw, groups, V, SV,
            CW: tl.constexpr):
    """(BR, CW, 32) fp32 coefficients of words ``w0 .. w0+CW`` (zero past ``nw``) of the band
    rows at (``tile``, ``lane``) of the tiled layout (runtime.py; ``V`` words and ``SV``
    statistics groups per lane vector)."""
    w = w0 + tl.arange(0, CW)
    wmask = w < nw
    mask = rmask[:, None] & wmask[None, :]
    widx = ((tile[:, None] * (nw // V) + w[None, :] // V) * 32 + lane[:, None]) * V + w[None, :] % V
    sw = tl.load(s_ptr + widx, mask=mask, other=0)
    mw = tl.load(m_ptr + widx, mask=mask, other=0)
    grp = tl.load(g_ptr + w, mask=wmask, other=0)
    gidx = ((tile[:, None] * (groups // SV) + grp[None, :] // SV) * 32 + lane[:, None]) * SV
    sb = st_ptr + (gidx + grp[None, :] % SV) * 4
    m0 = tl.load(sb, mask=mask, other=0).to(tl.float32)
    a0 = tl.load(sb + 1, mask=mask, other=0).to(tl.float32)
    m1 = tl.load(sb + 2, mask=mask, other=0).to(tl.float32)
    a1 = tl.load(sb + 3, mask=mask, other=0).to(tl.float32)
    bit = (1 << tl.arange(0, 32))[None, None, :]
    s = (sw[:, :, None] & bit) != 0
    g = (mw[:, :, None] & bit) != 0
    lo = tl.where(s, (m0 + a0)[:, :, None], (m0 - a0)[:, :, None])
    hi = tl.where(s, (m1 + a1)[:, :, None], (m1 - a1)[:, :, None])
    return tl.where(g, hi, lo)


@triton.jit
def _haar_x(x_ptr, toks, tmask, stride_x, w0, nw, c, BS: tl.constexpr, CW: tl.constexpr):
    """(BN, CW, 32) fp32 Haar-domain input of words ``w0..`` for token rows ``toks``: per block
    ``[c(x_even + x_odd) | c(x_even - x_odd)]``."""
    w = w0 + tl.arange(0, CW)
    col = w[:, None] * 32 + tl.arange(0, 32)[None, :]
    j = col % BS
    xi = (col - j + 2 * (j % (BS // 2)))[None, :, :] + toks[:, None, None] * stride_x
    mask = tmask[:, None, None] & (w < nw)[None, :, None]
    xe = tl.load(x_ptr + xi, mask=mask, other=0).to(tl.float32)
    xo = tl.load(x_ptr + xi + 1, mask=mask, other=0).to(tl.float32)
    return tl.where((j < BS // 2)[None, :, :], xe + xo, xe - xo) * c


@triton.jit
def _sal_x(x_ptr, sc_ptr, toks, tmask, stride_x, w0, nw, CW: tl.constexpr):
    """(BN, CW, 32) fp32 x at the salient slots of words ``w0..`` (0 in padding)."""
    w = w0 + tl.arange(0, CW)
    slot = w[:, None] * 32 + tl.arange(0, 32)[None, :]
    cols = tl.load(sc_ptr + slot, mask=(w < nw)[:, None], other=-1)
    mask = tmask[:, None, None] & (cols >= 0)[None, :, :]
    return tl.load(x_ptr + toks[:, None, None] * stride_x + cols[None, :, :], mask=mask,
                   other=0).to(tl.float32)


@triton.jit
def _row_gemv_kernel(x_ptr, y_ptr, ms, mm, mg, mst, ss, sm, sg, sst, sc,
                     R, W, SW, G, nblk, MV, MSV, SSV, c, stride_x, stride_y,
                     BS: tl.constexpr, BR: tl.constexpr, CW: tl.constexpr):
    pid = tl.program_id(0)
    tok = tl.program_id(1) + tl.arange(0, 1)
    tmask = tok >= 0
    P: tl.constexpr = BR // 2
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < R
    prow = pid * P + tl.arange(0, P)
    pmask = prow < R // 2
    acc = tl.zeros([BR, CW, 32], dtype=tl.float32)  # reduced once at the end
    for w0 in range(0, W, CW):
        z = _haar_x(x_ptr, tok, tmask, stride_x, w0, W, c, BS, CW)
        acc += _values(ms, mm, mg, mst, rows // 32, rows % 32, rmask, w0, W, G, MV, MSV, CW) * z
    acc_lo = tl.zeros([P, CW, 32], dtype=tl.float32)
    acc_hi = tl.zeros([P, CW, 32], dtype=tl.float32)
    for w0 in range(0, SW, CW):
        xs = _sal_x(x_ptr, sc, tok, tmask, stride_x, w0, SW, CW)
        acc_lo += _values(ss, sm, sg, sst, prow // 16, prow % 16, pmask, w0, SW, nblk, 1, SSV,
                          CW) * xs
        acc_hi += _values(ss, sm, sg, sst, prow // 16, prow % 16 + 16, pmask, w0, SW, nblk, 1,
                          SSV, CW) * xs
    lo = tl.sum(tl.sum(acc_lo, axis=2), axis=1)
    hi = tl.sum(tl.sum(acc_hi, axis=2), axis=1)
    y = tl.sum(tl.sum(acc, axis=2), axis=1) + tl.reshape(tl.join((lo + hi) * c, (lo - hi) * c), (BR,))
    tl.store(y_ptr + tl.program_id(1) * stride_y + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _row_mm_kernel(x_ptr, y_ptr, ms, mm, mg, mst, ss, sm, sg, sst, sc,
                   N, R, W, SW, G, nblk, MV, MSV, SSV, c, stride_x, stride_y,
                   BS: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, CW: tl.constexpr,
                   SPLIT: tl.constexpr):
    """Split-K over ``SPLIT`` programs per tile; partial sums are atomically added to fp32 y."""
    pid_r = tl.program_id(0)
    toks = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.program_id(2)
    tmask = toks < N
    P: tl.constexpr = BR // 2
    K: tl.constexpr = CW * 32
    dt = x_ptr.dtype.element_ty
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R
    prow = pid_r * P + tl.arange(0, P)
    pmask = prow < R // 2
    acc = tl.zeros([BN, BR], dtype=tl.float32)
    for w0 in range(ks * CW, W, CW * SPLIT):
        z = tl.reshape(_haar_x(x_ptr, toks, tmask, stride_x, w0, W, c, BS, CW), (BN, K))
        v = tl.reshape(_values(ms, mm, mg, mst, rows // 32, rows % 32, rmask, w0, W, G, MV, MSV,
                               CW), (BR, K))
        acc = tl.dot(z.to(dt), tl.trans(v.to(dt)), acc)
    acc_lo = tl.zeros([BN, P], dtype=tl.float32)
    acc_hi = tl.zeros([BN, P], dtype=tl.float32)
    for w0 in range(ks * CW, SW, CW * SPLIT):
        xs = tl.reshape(_sal_x(x_ptr, sc, toks, tmask, stride_x, w0, SW, CW), (BN, K)).to(dt)
        vl = tl.reshape(_values(ss, sm, sg, sst, prow // 16, prow % 16, pmask, w0, SW, nblk, 1,
                                SSV, CW), (P, K))
        vh = tl.reshape(_values(ss, sm, sg, sst, prow // 16, prow % 16 + 16, pmask, w0, SW, nblk,
                                1, SSV, CW), (P, K))
        acc_lo = tl.dot(xs, tl.trans(vl.to(dt)), acc_lo)
        acc_hi = tl.dot(xs, tl.trans(vh.to(dt)), acc_hi)
    sal = tl.reshape(tl.join((acc_lo + acc_hi) * c, (acc_lo - acc_hi) * c), (BN, BR))
    optr = y_ptr + toks[:, None] * stride_y + rows[None, :]
    tl.atomic_add(optr, acc + sal, mask=tmask[:, None] & rmask[None, :])


@triton.jit
def _band_mm_kernel(z_ptr, out_ptr, s_ptr, m_ptr, g_ptr, st_ptr, N, Rb, W, groups, V, SV,
                    stride_z, stride_o, BN: tl.constexpr, BM: tl.constexpr, CW: tl.constexpr):
    """Pair rows: band row r is pair r % (Rb/2), high half for r >= Rb/2 (runtime.py)."""
    pid_m = tl.program_id(0)
    toks = tl.program_id(1) * BN + tl.arange(0, BN)
    tmask = toks < N
    K: tl.constexpr = CW * 32
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < Rb
    high = rows >= Rb // 2
    pair = tl.where(high, rows - Rb // 2, rows)
    tile, lane = pair // 16, pair % 16 + 16 * high.to(tl.int32)
    kk = tl.arange(0, K)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for w0 in range(0, W, CW):
        kmask = (w0 * 32 + kk) < W * 32
        z = tl.load(z_ptr + toks[:, None] * stride_z + w0 * 32 + kk[None, :],
                    mask=tmask[:, None] & kmask[None, :], other=0)
        v = tl.reshape(_values(s_ptr, m_ptr, g_ptr, st_ptr, tile, lane, rmask, w0, W, groups, V,
                               SV, CW), (BM, K))
        acc = tl.dot(z, tl.trans(v.to(z.dtype)), acc)
    optr = out_ptr + toks[:, None] * stride_o + rows[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & rmask[None, :])


def _row_args(rt: dict):
    return (rt["main_sign"], rt["main_member"], rt["main_wgrp"], rt["main_stats"], rt["sal_sign"],
            rt["sal_member"], rt["sal_wgrp"], rt["sal_stats"], rt["sal_cols"])


def _sizes(rt: dict, meta: dict) -> tuple:
    """R, W, SW, G, blocks, main word vector, main and salient statistics vectors."""
    st = rt["main_stats"]  # (T, G/SV, 32, SV, 4)
    return (meta["rows"], meta["cols"] // 32, rt["sal_wgrp"].numel(), st.shape[1] * st.shape[3],
            meta["cols"] // meta["blocksize"], rt["main_sign"].shape[-1], st.shape[3],
            rt["sal_stats"].shape[3])


def row_gemv(x: torch.Tensor, rt: dict, meta: dict, c: float) -> torch.Tensor:
    """Row-layout decode: x (N, C) contiguous, few tokens -> y (N, R) in x's dtype."""
    n, cols = x.shape
    rows, cfg = meta["rows"], GEMV_CONFIG
    y = torch.empty(n, rows, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(rows, cfg["br"]), n)
    _row_gemv_kernel[grid](x, y, *_row_args(rt), *_sizes(rt, meta), c, x.stride(0),
                           y.stride(0), BS=meta["blocksize"], BR=cfg["br"], CW=cfg["cw"],
                           num_warps=cfg["num_warps"])
    return y


def row_mm(x: torch.Tensor, rt: dict, meta: dict, c: float) -> torch.Tensor:
    """Row-layout tiled path: x (N, C) fp16/bf16 contiguous -> y (N, R) in x's dtype."""
    n, cols = x.shape
    rows, cfg = meta["rows"], MM_CONFIG
    y = torch.zeros(n, rows, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(rows, cfg["br"]), triton.cdiv(n, cfg["bn"]), cfg["split"])
    _row_mm_kernel[grid](x, y, *_row_args(rt), n, *_sizes(rt, meta), c, x.stride(0), y.stride(0),
                         BS=meta["blocksize"], BN=cfg["bn"], BR=cfg["br"], CW=cfg["cw"],
                         SPLIT=cfg["split"], num_warps=cfg["num_warps"])
    return y.to(x.dtype)


def band_mm(z: torch.Tensor, sign: torch.Tensor, member: torch.Tensor, wgrp: torch.Tensor,
            stats: torch.Tensor, rb: int) -> torch.Tensor:
    """out (N, Rb) float32 = z (N, 32W) fp16/bf16 @ band^T; a pair-row band of ``rb`` rows, tiled
    (runtime.py): words (T, W/V, 32, V), groups (W,), stats (T, G/SV, 32, SV, 4)."""
    n = z.shape[0]
    words = wgrp.numel()
    cfg = MM_CONFIG
    out = torch.empty(n, rb, device=z.device, dtype=torch.float32)
    if words == 0:
        return out.zero_()
    grid = (triton.cdiv(rb, cfg["br"]), triton.cdiv(n, cfg["bn"]))
    _band_mm_kernel[grid](z, out, sign, member, wgrp, stats, n, rb, words,
                          stats.shape[1] * stats.shape[3], sign.shape[-1], stats.shape[3],
                          z.stride(0), out.stride(0), BN=cfg["bn"], BM=cfg["br"], CW=cfg["cw"],
                          num_warps=cfg["num_warps"])
    return out

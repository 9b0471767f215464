"""Compute-friendly form of a packed linear, and the plain-torch forward that uses it.

Everything is expressed as *bands*: a band is a (R, n) matrix of binarized coefficients whose
sign and group bits are packed 32 per int32 word along each row (LSB first) and whose fp16
statistics ``[mean0, scale0, mean1, scale1]`` are per row and per group of ``gw`` columns.
With the inverse-Haar constant ``c``:

* row layout: ``W x = B_main z`` with ``z = [c(x_even + x_odd) | c(x_even - x_odd)]`` per block;
* col layout: ``u = B_main (x * nonsalient)``, rows of ``u`` are [low pairs; high pairs] and
  ``y[2i] = c(u_low + u_high)``, ``y[2i+1] = c(u_low - u_high)``;
* salient residual (both): ``u = B_sal x[sal_cols]`` with the same pair interleave as col.

The salient columns of a block fill ceil(k/32) words of their own; padded slots have column
index -1 and read x as 0.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..quant.haar import INVERSE
from .format import unpackbits


def pack_words(bits: torch.Tensor) -> torch.Tensor:
    """bool (R, n), n % 32 == 0 -> int32 (R, n/32), bit t of word w is column 32w + t."""
    r, n = bits.shape
    shifts = torch.arange(32, dtype=torch.int64, device=bits.device)
    words = (bits.view(r, n // 32, 32).long() << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_words`: int32 (R, m) -> bool (R, 32m)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)


def _full_stats(stats: torch.Tensor) -> torch.Tensor:
    """(..., 3|4) fp16 -> (..., 4) ``[mean0, scale0, mean1, scale1]``."""
    if stats.shape[-1] == 4:
        return stats
    m, a0, a1 = stats.unbind(-1)
    return torch.stack([m, a0, m, a1], -1)


def build_runtime(t: Dict[str, torch.Tensor], meta: dict) -> Dict[str, torch.Tensor]:
    """Disk tensors (see format.py) -> compute buffers on the tensors' device.

    Bands: ``{main,sal}_sign``/``_member`` int32 words (R, W), ``_wgrp`` int32 (W,) statistics
    group of each word, ``_stats`` fp16 (R, G, 4). ``ns_mask`` bool (C,) (col layout only).
    ``sal_cols`` int32 (32 W_sal,): x column of each salient slot, -1 for padding; the salient
    columns of a block fill ceil(k/32) words of their own, words ``sal_first[b] .. sal_first[b+1]-1``
    (int32, (blocks + 1,)).
    """
    rows, cols, bs = meta["rows"], meta["cols"], meta["blocksize"]
    nblk, half = cols // bs, rows // 2
    dev = t["sign_main"].device
    counts = t["sal_count"].long().to(dev)
    k_total = int(counts.sum())
    out = {}
    block_of = torch.repeat_interleave(torch.arange(nblk, device=dev), counts)
    sal_global = t["sal_index"].long().to(dev) + block_of * bs
    words = torch.arange(cols // 32, device=dev, dtype=torch.int32)
    if meta["layout"] == "row":
        shape = (rows, nblk, 2, bs // 2)
        out["main_sign"] = pack_words(unpackbits(t["sign_main"], shape).view(rows, cols))
        out["main_member"] = pack_words(unpackbits(t["member_main"], shape).view(rows, cols))
        out["main_stats"] = _full_stats(t["stats_main"]).reshape(rows, 2 * nblk, 4).contiguous()
        out["main_wgrp"] = words // (bs // 64)
    else:
        keep = torch.ones(cols, dtype=torch.bool, device=dev)
        keep[sal_global] = False
        for key in ("sign", "member"):
            bits = unpackbits(t[f"{key}_main"], (2, half, cols - k_total))
            full = torch.zeros(2, half, cols, dtype=torch.bool, device=dev)
            full[:, :, keep] = bits
            out[f"main_{key}"] = pack_words(full.view(rows, cols))
        out["main_stats"] = _full_stats(t["stats_main"]).reshape(rows, nblk, 4).contiguous()
        out["main_wgrp"] = words // (bs // 32)
        out["ns_mask"] = keep
    nwords = (counts + 31) // 32
    first = torch.cumsum(nwords, 0) - nwords
    rank = torch.arange(k_total, device=dev) - (torch.cumsum(counts, 0) - counts)[block_of]
    slot = first[block_of] * 32 + rank
    n_sal = int(nwords.sum())
    sal_cols = torch.full((n_sal * 32,), -1, dtype=torch.int32, device=dev)
    sal_cols[slot] = sal_global.to(torch.int32)
    out["sal_cols"] = sal_cols
    out["sal_wgrp"] = torch.repeat_interleave(torch.arange(nblk, device=dev), nwords).to(torch.int32)
    out["sal_first"] = torch.cat([first, first[-1:] + nwords[-1:]]).to(torch.int32)
    for key in ("sign", "member"):
        bits = unpackbits(t[f"{key}_sal"], (2, half, k_total))
        full = torch.zeros(2, half, n_sal * 32, dtype=torch.bool, device=dev)
        full[:, :, slot] = bits
        out[f"sal_{key}"] = pack_words(full.view(rows, n_sal * 32))
    out["sal_stats"] = t["stats_sal"].to(dev).reshape(rows, nblk, 4).contiguous()
    return out


def band_dense(sign: torch.Tensor, member: torch.Tensor, wgrp: torch.Tensor,
               stats: torch.Tensor) -> torch.Tensor:
    """Dequantize a band: int32 words (R, W), groups (W,), fp16 stats (R, G, 4) -> fp32 (R, 32W)."""
    s, g = unpack_words(sign), unpack_words(member)
    st = stats.float()[:, wgrp.long().repeat_interleave(32)]  # (R, 32W, 4)
    m = torch.where(g, st[..., 2], st[..., 0])
    a = torch.where(g, st[..., 3], st[..., 1])
    return m + torch.where(s, a, -a)


def haar_input(x: torch.Tensor, blocksize: int, c: float) -> torch.Tensor:
    """(N, C) -> (N, C): per block ``[c(x_even + x_odd) | c(x_even - x_odd)]``."""
    n, cols = x.shape
    p = x.view(n, cols // blocksize, blocksize // 2, 2)
    e, o = p[..., 0], p[..., 1]
    return torch.stack([(e + o) * c, (e - o) * c], 2).reshape(n, cols)


def pair_output(u: torch.Tensor, c: float) -> torch.Tensor:
    """(N, R) rows [low pairs; high pairs] -> (N, R) interleaved ``c(lo+hi), c(lo-hi)``."""
    lo, hi = u.chunk(2, dim=1)
    return torch.stack([(lo + hi) * c, (lo - hi) * c], -1).flatten(1)


def salient_input(x: torch.Tensor, sal_cols: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, 32 W_sal): x at the salient columns, 0 in padded slots."""
    idx = sal_cols.long()
    return x[:, idx.clamp(min=0)] * (idx >= 0).to(x.dtype)


def torch_forward(x: torch.Tensor, rt: Dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """y = x W^T for x (N, C) in float32 math, from the compute buffers (band form)."""
    c = INVERSE[meta["inverse"]]
    x = x.float()
    main = band_dense(rt["main_sign"], rt["main_member"], rt["main_wgrp"], rt["main_stats"])
    if meta["layout"] == "row":
        y = haar_input(x, meta["blocksize"], c) @ main.T
        u_sal = 0.0
    else:
        y = 0.0
        u_sal = (x * rt["ns_mask"]) @ main.T
    sal = band_dense(rt["sal_sign"], rt["sal_member"], rt["sal_wgrp"], rt["sal_stats"])
    u_sal = u_sal + salient_input(x, rt["sal_cols"]) @ sal.T
    return y + pair_output(u_sal, c)

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

**Tiled (coalesced) layout.** On the device, a band's words and statistics are stored by *row
tiles* of 32 rows, the rows one warp's 32 lanes own, so that a warp reading one word (or one
statistics group) for its 32 rows reads consecutive memory:

* words int32 ``(T, W/V, 32, V)``: tile ``t``, word ``w`` of lane ``l`` at ``[t, w // V, l, w % V]``
  (``V`` words of a lane are one 16-byte (V=4) or 8-byte (V=2) load, a warp's load is 32V
  consecutive words);
* statistics fp16 ``(T, G/SV, 32, SV, 4)``: group ``g`` of lane ``l`` at
  ``[t, g // SV, l, g % SV]``.

Lane ``l`` of tile ``t`` is band row ``32t + l`` for the row layout's main band (*direct* rows: the
output rows) and, for the bands whose rows are [low pairs; high pairs] (col layout main band,
salient residual of both layouts; *pair* rows), the pair ``16t + l % 16``'s low row (l < 16) or high
row (l >= 16), so that one warp holds both halves of 16 pairs. ``T = ceil(R / 32)``; rows past the
band are zero words and zero statistics. This is built at load time from the on-disk format
(format.py is unchanged); :func:`untile` gives the (R, W) / (R, G, 4) row-major arrays back.
"""
from __future__ import annotations

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


def tile_slots(rows: int, pair: bool, device=None) -> torch.Tensor:
    """int64 (T * 32,): the band row held by lane ``l`` of tile ``t`` (slot ``32t + l``), -1 for
    padding; ``pair``: rows are [low pairs; high pairs] (see the module docstring)."""
    tiles = (rows + 31) // 32
    slot = torch.arange(tiles * 32, device=device)
    if not pair:
        return torch.where(slot < rows, slot, -1)
    half, lane = rows // 2, slot % 32
    p = 16 * (slot // 32) + lane % 16
    return torch.where(p < half, p + (lane >= 16).long() * half, -1)


def tile(a: torch.Tensor, pair: bool, vec: int) -> torch.Tensor:
    """Row-major ``a`` (R, n, *e) -> tiled (T, n/vec, 32, vec, *e) (zero rows as padding)."""
    rows, n, rest = a.shape[0], a.shape[1], tuple(a.shape[2:])
    slots = tile_slots(rows, pair, a.device)
    out = a.new_zeros((slots.numel(), n) + rest)
    live = slots >= 0
    out[live] = a[slots[live]]
    out = out.view(slots.numel() // 32, 32, n // vec, vec, *rest)
    return out.transpose(1, 2).contiguous()


def untile(a: torch.Tensor, rows: int, pair: bool) -> torch.Tensor:
    """Inverse of :func:`tile`: (T, n/vec, 32, vec, *e) -> (rows, n, *e)."""
    tiles, nv, _, vec = a.shape[:4]
    rest = tuple(a.shape[4:])
    flat = a.transpose(1, 2).reshape((tiles * 32, nv * vec) + rest)
    slots = tile_slots(rows, pair, a.device)
    live = slots >= 0
    out = a.new_empty((rows, nv * vec) + rest)
    out[slots[live]] = flat[live]
    return out


def word_vec(words_per_block: int) -> int:
    """Words per lane load of a main band: 4 (16 bytes) where blocks have a multiple of 4 words,
    else 2 (blocksize 64); chunks of whole blocks then start on a vector."""
    return 4 if words_per_block % 4 == 0 else 2


def stats_vec(groups: int) -> int:
    """Statistics groups per lane load: 2 (16 bytes) where the count is even, else 1."""
    return 2 if groups % 2 == 0 else 1


def band_rows(band: str, meta: dict) -> bool:
    """Whether ``band`` ("main" or "sal") of a linear has pair rows (else direct rows)."""
    return band == "sal" or meta["layout"] == "col"


def build_runtime(t: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Disk tensors (see format.py) -> compute buffers on the tensors' device.

    Bands, tiled (module docstring): ``{main,sal}_sign``/``_member`` int32 words (T, W/V, 32, V)
    (``V`` = :func:`word_vec` for main, 1 for salient), ``_stats`` fp16 (T, G/SV, 32, SV, 4)
    (``SV`` = :func:`stats_vec` of G); ``_wgrp`` int32 (W,) statistics group of each word.
    ``ns_mask`` bool (C,) (col layout only).
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
    for band, vec in (("main", word_vec(bs // 32)), ("sal", 1)):
        pair = band_rows(band, meta)
        for key in ("sign", "member"):
            out[f"{band}_{key}"] = tile(out[f"{band}_{key}"], pair, vec)
        st = out[f"{band}_stats"]
        out[f"{band}_stats"] = tile(st, pair, stats_vec(st.shape[1]))
    return out


def band_words(rt: dict[str, torch.Tensor], band: str, meta: dict):
    """Row-major (sign, member) int32 (R, W) and stats fp16 (R, G, 4) of a band of ``rt``."""
    pair, rows = band_rows(band, meta), meta["rows"]
    return (untile(rt[f"{band}_sign"], rows, pair), untile(rt[f"{band}_member"], rows, pair),
            untile(rt[f"{band}_stats"], rows, pair))


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


def torch_forward(x: torch.Tensor, rt: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """y = x W^T for x (N, C) in float32 math, from the compute buffers (band form)."""
    c = INVERSE[meta["inverse"]]
    x = x.float()
    ms, mm, mst = band_words(rt, "main", meta)
    main = band_dense(ms, mm, rt["main_wgrp"], mst)
    if meta["layout"] == "row":
        y = haar_input(x, meta["blocksize"], c) @ main.T
        u_sal = 0.0
    else:
        y = 0.0
        u_sal = (x * rt["ns_mask"]) @ main.T
    ss, sm, sst = band_words(rt, "sal", meta)
    sal = band_dense(ss, sm, rt["sal_wgrp"], sst)
    u_sal = u_sal + salient_input(x, rt["sal_cols"]) @ sal.T
    return y + pair_output(u_sal, c)

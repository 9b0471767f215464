"""Codebook form of a packed linear for the tensor-core GEMV (:mod:`hbllm.packed.cuda_codebook`).

A coefficient of a band row is one of four values per statistics group, ``m_g + a_g (2s - 1)``:
its 2-bit code ``c = s + 2g`` picks it from the row's *codebook*
``[m0 - a0, m0 + a0, m1 - a1, m1 + a1]`` (fp16, 8 bytes, the same size as the statistics).
The codes are stored in the order the MMA reads them, so that a lane turns one stored word into
eight fp16 pairs of its A fragments with a few integer instructions and one byte permute each:

* a row tile (32 band slots of :func:`hbllm.packed.runtime.tile_slots`) is two MMA tiles of 16
  rows: slots 0-15 ("A") and 16-31 ("B"); lane ``l = 4g + q`` holds rows ``g, g + 8`` of each;
* per 32-column word, lane ``l`` gets two int32: ``A`` (rows g, g + 8 of tile A) and ``B``
  (tile B). Register ``j = 4 tau + 2 r + h`` (k16 step ``tau``, k half ``r``, row ``g + 8h``)
  covers columns ``8q + 4 tau + 2 r`` (even) and the next (odd), so that lane q's B fragments
  of a word are its columns 8q .. 8q + 7 (inputs staged in plain column order); their codes sit
  at bits ``P_j, P_j + 1`` and ``P_j + 8, P_j + 9`` with ``P = FIELDS``;
* the codebook is stored as bytes (:func:`byte_planes`): the four values' high bytes, then their
  low bytes, so that value ``c`` is bytes ``c + 4`` (low) and ``c`` (high);
* :func:`selector` turns such a word into the byte-permute selector that picks the even and odd
  fp16 values out of the two codebook registers (``__byte_perm(book_lo, book_hi, sel)``).

Buffers (:func:`build`), tiled like the runtime's (a warp's load is consecutive memory):
``cb_main`` int32 (T, W/2, 32, 4) -- words ``2i, 2i + 1`` of a lane as ``(A, B, A, B)``;
``cb_sal`` int32 (T, W_sal, 32, 2), its storage followed by :data:`SPARE_SAL_WORDS` zero words
(32, 2); ``book_main`` (T, blocks, 32, 4 * groups per block) and
``book_sal`` (T, blocks, 32, 4): codebooks in :func:`byte_planes` order, typed fp16. fp16 inputs
only (a bf16 codebook would round the values).
"""
from __future__ import annotations

import torch

from .runtime import band_rows, band_words, tile, unpack_words

FIELDS = (0, 2, 4, 6, 16, 18, 20, 22)  # bit of register j's even code; its odd code is 8 higher
SPARE_SAL_WORDS = 2  # zero words in ``cb_sal``'s storage after its last (see build)


def selector(word: torch.Tensor, p: int) -> torch.Tensor:
    """Byte-permute selector of the register whose codes ``c`` (even column) and ``c'`` (odd)
    sit at bits ``p, p + 1`` and ``p + 8, p + 9`` of a 32-bit word, computed the kernel's way
    (``cuda_codebook.DECODE``). Its low 16 bits are the nibbles ``c + 4, c, c' + 4, c'`` (the
    low and high bytes of codebook values c and c', :func:`byte_planes`), i.e. ``m * 0x11 +
    0x0404`` with ``m = (word >> p) & 0x0303``; bits 16-31 hold other codes (the permute reads
    only the low 16). Registers p and p + 16 share one mask of their four codes: ``word &
    0x03030303`` (p = 0, 16) or ``(word << (6 - p % 16)) & 0xc0c0c0c0`` (codes at bits 6, 14,
    22, 30), then one multiply-add (p = 0) or multiply-high-add each. int64 in (0 .. 2**32 - 1),
    int64 out (0 .. 2**32 - 1)."""
    base = p % 16
    if base == 0:
        m = word & 0x03030303
        return m * 0x11 + 0x0404 if p == 0 else ((m * (0x11 << 16)) >> 32) + 0x0404
    m = (word << (6 - base)) & 0xC0C0C0C0
    mult = 0x11 << (26 if p < 16 else 10)
    return ((m * mult) >> 32) + 0x0404


def book(stats: torch.Tensor) -> torch.Tensor:
    """fp16 statistics (..., 4) ``[m0, a0, m1, a1]`` -> fp16 codebook ``[m0-a0, m0+a0, m1-a1,
    m1+a1]`` (computed in float32, rounded once)."""
    m0, a0, m1, a1 = stats.float().unbind(-1)
    return torch.stack([m0 - a0, m0 + a0, m1 - a1, m1 + a1], -1).to(torch.float16)


def byte_planes(values: torch.Tensor) -> torch.Tensor:
    """fp16 codebooks (..., 4) -> the kernel's byte order, as fp16 (..., 4): bytes ``[hi0, hi1,
    hi2, hi3, lo0, lo1, lo2, lo3]`` of the four values."""
    b = values.contiguous().view(torch.uint8).unflatten(-1, (4, 2))  # (..., value, [lo, hi])
    return torch.cat([b[..., 1], b[..., 0]], -1).contiguous().view(torch.float16)


def _lane_maps(device):
    """(slot (32, 2, 8), even column (32, 8)) of lane l, word A/B, register j."""
    lane = torch.arange(32, device=device)
    g, q = lane // 4, lane % 4
    j = torch.arange(8, device=device)
    tau, r, h = j // 4, (j // 2) % 2, j % 2
    slot = (g[:, None, None] + 8 * h[None, None, :] + 16 * torch.arange(2, device=device)[None, :, None])
    col = 8 * q[:, None] + 4 * tau[None, :] + 2 * r[None, :]
    return slot, col


def pack_codes(sign: torch.Tensor, member: torch.Tensor, pair: bool) -> torch.Tensor:
    """Row-major band words (R, W) int32 -> codebook codes int32 (T, W, 32, 2)."""
    code = unpack_words(sign).long() | (unpack_words(member).long() << 1)  # (R, 32W)
    c = tile(code, pair, 32)  # (T, W, slot, col), zero codes in padding slots
    slot, col = _lane_maps(code.device)
    even = c[:, :, slot, col[:, None, :]]  # (T, W, 32, 2, 8)
    odd = c[:, :, slot, col[:, None, :] + 1]
    p = torch.tensor(FIELDS, device=code.device)
    word = ((even << p) | (odd << (p + 8))).sum(-1)  # disjoint fields: sum = or
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def build(rt: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Codebook buffers (module docstring) from the runtime buffers of
    :func:`hbllm.packed.runtime.build_runtime`, on their device."""
    nblk = meta["cols"] // meta["blocksize"]
    out = {}
    for band in ("main", "sal"):
        pair = band_rows(band, meta)
        sign, member, stats = band_words(rt, band, meta)
        codes = pack_codes(sign, member, pair)  # (T, W, 32, 2)
        gpb = stats.shape[1] // nblk  # groups (codebooks) per block
        bk = tile(byte_planes(book(stats)), pair, gpb)  # (T, NB, 32, gpb, 4)
        tiles = bk.shape[0]
        bk = bk.reshape(tiles, nblk, 32, 4 * gpb)
        if band == "main":
            w = codes.shape[1]
            codes = codes.view(tiles, w // 2, 2, 32, 2).transpose(2, 3).reshape(tiles, w // 2, 32, 4)
        else:  # two zero words after the last tile's (the row-tile GEMV loads a block's first two
            # salient words whether it has them or not)
            spare = torch.zeros(codes.numel() + SPARE_SAL_WORDS * 32 * 2, dtype=codes.dtype,
                                device=codes.device)
            spare[:codes.numel()] = codes.flatten()
            codes = spare[:codes.numel()].view(codes.shape)
        out[f"cb_{band}"], out[f"book_{band}"] = codes.contiguous(), bk
    return out

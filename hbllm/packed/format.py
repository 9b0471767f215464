"""On-disk form of one packed linear: flat safetensors tensors plus a small JSON entry.

Tensors of a linear named ``p`` (bits are packed 8 per byte, LSB first, in C order):
  ``p.sign_main``, ``p.member_main``  uint8  main-band bits
      row layout: bool (rows, nblk, 2[low,high], blocksize/2)
      col layout: bool (2[low,high], rows/2, cols - K), non-salient columns in order
  ``p.stats_main``  fp16  row: (rows, nblk, 2, S); col: (2, rows/2, nblk, S);
      S = 4 ``[mean0, scale0, mean1, scale1]`` or 3 ``[mean, scale0, scale1]`` (shared mean)
  ``p.sal_index``  uint8 (K,) salient column indices inside their block (int16 if blocksize > 256)
  ``p.sal_count``  int16 (nblk,) salient columns per block, K = sum
  ``p.sign_sal``, ``p.member_sal``  uint8  bool (2[low,high], rows/2, K)
  ``p.stats_sal``  fp16 (2, rows/2, nblk, 4)
Group 1 is the ``|x| >= t`` group; a sign bit of 1 means ``+scale``.
"""
from __future__ import annotations

import torch

from .codes import BandCodes, BlockCodes, LinearCodes

FORMAT_VERSION = 1
TENSOR_KEYS = ("sign_main", "member_main", "stats_main", "sal_index", "sal_count",
               "sign_sal", "member_sal", "stats_sal")


def packbits(bits: torch.Tensor) -> torch.Tensor:
    """bool tensor (any shape) -> uint8 (ceil(numel/8),), LSB first."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpackbits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`packbits`: uint8 (m,) -> bool ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool().reshape(shape)


def _stats(band: BandCodes) -> torch.Tensor:
    """(r, S) fp16 statistics of a band in storage order."""
    if band.shared_mean:
        s = torch.cat([band.mean, band.scale], dim=1)
    else:
        s = torch.stack([band.mean[:, 0], band.scale[:, 0], band.mean[:, 1], band.scale[:, 1]], 1)
    return s.to(torch.float16)


def pack_linear(codes: LinearCodes) -> dict[str, torch.Tensor]:
    """LinearCodes -> {key: CPU tensor} (keys of :data:`TENSOR_KEYS`) and nothing else."""
    blocks = codes.blocks
    half = codes.rows // 2
    if codes.layout == "row":
        sign = torch.stack([torch.stack([b.low.sign, b.high.sign], 1) for b in blocks], 1)
        member = torch.stack([torch.stack([b.low.member, b.high.member], 1) for b in blocks], 1)
        stats = torch.stack([torch.stack([_stats(b.low), _stats(b.high)], 1) for b in blocks], 1)
    else:
        sign = torch.stack([torch.cat([b.low.sign for b in blocks], 1),
                            torch.cat([b.high.sign for b in blocks], 1)])
        member = torch.stack([torch.cat([b.low.member for b in blocks], 1),
                              torch.cat([b.high.member for b in blocks], 1)])
        stats = torch.stack([torch.stack([_stats(b.low) for b in blocks], 1),
                             torch.stack([_stats(b.high) for b in blocks], 1)])
    counts = torch.tensor([int(b.salient.numel()) for b in blocks], dtype=torch.int16)
    idx_dtype = torch.uint8 if codes.blocksize <= 256 else torch.int16
    index = torch.cat([b.salient.reshape(-1).cpu() for b in blocks]).to(idx_dtype)
    empty_bits = torch.zeros(half, 0, dtype=torch.bool)
    zero_stats = torch.zeros(half, 4, dtype=torch.float16)

    def sal(attr: str, field: str) -> torch.Tensor:
        parts = []
        for b in blocks:
            band = getattr(b, attr)
            parts.append(getattr(band, field).cpu() if band is not None else empty_bits)
        return torch.cat(parts, 1)

    def sal_stats(attr: str) -> torch.Tensor:
        out = []
        for b in blocks:
            band = getattr(b, attr)
            if band is not None and band.shared_mean:
                raise ValueError("salient residual bands never use the shared mean "
                                 "(docs/method.md 5.4)")
            out.append(_stats(band).cpu() if band is not None else zero_stats)
        return torch.stack(out, 1)

    return {
        "sign_main": packbits(sign.cpu()), "member_main": packbits(member.cpu()),
        "stats_main": stats.cpu().contiguous(),
        "sal_index": index, "sal_count": counts,
        "sign_sal": packbits(torch.stack([sal("sal_low", "sign"), sal("sal_high", "sign")])),
        "member_sal": packbits(torch.stack([sal("sal_low", "member"), sal("sal_high", "member")])),
        "stats_sal": torch.stack([sal_stats("sal_low"), sal_stats("sal_high")]).contiguous(),
    }


def linear_meta(codes: LinearCodes) -> dict:
    """The manifest entry of a packed linear (JSON-serializable)."""
    shared = codes.blocks[0].low.shared_mean
    return {"layout": codes.layout, "rows": codes.rows, "cols": codes.cols,
            "blocksize": codes.blocksize, "inverse": codes.inverse, "shared_mean": shared}


def _band(sign, member, stats) -> BandCodes:
    stats = stats.float()
    if stats.shape[-1] == 3:
        return BandCodes(sign, member, stats[:, :1], stats[:, 1:])
    return BandCodes(sign, member, stats[:, 0::2], stats[:, 1::2])


def unpack_linear(t: dict[str, torch.Tensor], meta: dict) -> LinearCodes:
    """Inverse of :func:`pack_linear` (statistics come back as float32 of the fp16 values)."""
    rows, cols, bs = meta["rows"], meta["cols"], meta["blocksize"]
    nblk, half = cols // bs, rows // 2
    counts = t["sal_count"].long()
    k_total = int(counts.sum())
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    salient = t["sal_index"].long()
    ssig = unpackbits(t["sign_sal"], (2, half, k_total))
    smem = unpackbits(t["member_sal"], (2, half, k_total))
    sstats = t["stats_sal"]
    blocks = []
    if meta["layout"] == "row":
        sign = unpackbits(t["sign_main"], (rows, nblk, 2, bs // 2))
        member = unpackbits(t["member_main"], (rows, nblk, 2, bs // 2))
    else:
        sign = unpackbits(t["sign_main"], (2, half, cols - k_total))
        member = unpackbits(t["member_main"], (2, half, cols - k_total))
    stats = t["stats_main"]
    for b in range(nblk):
        lo, hi = offsets[b], offsets[b + 1]
        if meta["layout"] == "row":
            bands = [_band(sign[:, b, h], member[:, b, h], stats[:, b, h]) for h in (0, 1)]
        else:
            ns_lo, ns_hi = b * bs - lo, (b + 1) * bs - hi
            bands = [_band(sign[h, :, ns_lo:ns_hi], member[h, :, ns_lo:ns_hi], stats[h, :, b])
                     for h in (0, 1)]
        sal = [_band(ssig[h, :, lo:hi], smem[h, :, lo:hi], sstats[h, :, b]) for h in (0, 1)] \
            if hi > lo else [None, None]
        blocks.append(BlockCodes(salient[lo:hi], bands[0], bands[1], sal[0], sal[1]))
    return LinearCodes(meta["layout"], rows, cols, bs, meta["inverse"], blocks)


def tensor_bytes(t: dict[str, torch.Tensor]) -> int:
    """Payload bytes of a packed linear's tensors."""
    return sum(v.numel() * v.element_size() for v in t.values())

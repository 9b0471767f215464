"""Where a row-tile GEMV launch spends its time: per-warp timestamps inside the kernel.

    PYTHONPATH=$PWD python3 scripts/tile_timeline.py [--tokens 1] [--json F] [WARPS ...]

WARPS: warps a block of :mod:`hbllm.packed.cuda_tile` (default: its CONFIG's). For each
LLaMA-2-7B shape, the HBLLM-row layer of ``bench_kernel.py`` (same random weight and seed) is
copied to twice the L2 in bytes and the copies are called in turn (plain launches, weights from
DRAM), then once more each with the kernel built with ``PROBE``, whose warps stamp their SM
clock at each step (the last call's stamps are kept). Per step, the median and the slowest
warp, in microseconds:

- ``wait``: entry to ``dep_wait`` returning (the first block's loads are issued before it);
- ``stage``: the inputs staged in shared memory, up to the barrier after it;
- ``unit1``: the first quantization block decoded (its loads were issued at entry);
- ``units``: the warp's other blocks of its first row tile;
- ``reduce``: partial outputs through shared memory, the barrier, the tile's outputs written;
- ``tiles``: the row tiles after the first (persistent blocks: more tiles than blocks);
- ``start skew``: the spread of the blocks' start times; ``span``: first warp start to last
  warp end (global timer).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from hbllm.config import QuantConfig  # noqa: E402
from hbllm.packed import cuda_tile  # noqa: E402
from hbllm.quant.haar import INVERSE  # noqa: E402

STEPS = ("wait", "stage", "unit1", "units", "reduce", "tiles")


def timeline(stamps: torch.Tensor) -> dict:
    """(warps, 16) int64 stamps -> {step: (median, max) us} plus ``start skew`` and ``span``."""
    s = stamps.double()
    ns = s[:, 8] - s[:, 7]
    cycles_per_ns = ((s[:, 6] - s[:, 0]) / ns.clamp(min=1)).median().item()
    out = {"GHz": cycles_per_ns}
    for i, step in enumerate(STEPS):
        us = (s[:, i + 1] - s[:, i]) / cycles_per_ns / 1e3
        out[step] = (us.median().item(), us.max().item())
    out["start skew"] = ((s[:, 7].max() - s[:, 7].min()) / 1e3).item()
    out["span"] = ((s[:, 8].max() - s[:, 7].min()) / 1e3).item()
    return out


def probe_run(mods, x: torch.Tensor, cfg: dict) -> dict:
    """Calls every copy twice (warm-up), then each once more with the probe kernel."""
    old = dict(cuda_tile.CONFIG)
    cuda_tile.CONFIG.clear()
    cuda_tile.CONFIG.update(cfg)
    table, cuda_tile.TUNED = cuda_tile.TUNED, {}
    try:
        for m in mods * 2:
            m(x)
        meta = mods[0].meta
        tiles, warps = (meta["rows"] + 31) // 32, cfg["warps"]
        probe = torch.zeros(tiles * warps, 16, dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()
        for m in mods:
            cuda_tile.gemv(x, m.runtime(), meta, INVERSE[meta["inverse"]], m._scratch,
                           probe=probe)
        torch.cuda.synchronize()
        live = probe[probe[:, 8] > 0]  # blocks past the grid write nothing
        return timeline(live.cpu())
    finally:
        cuda_tile.CONFIG.clear()
        cuda_tile.CONFIG.update(old)
        cuda_tile.TUNED = table


def main() -> None:
    from bench_kernel import SHAPES, packed_copies, quantize_shape
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("warps", nargs="*", type=int)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configs = [dict(warps=w, pdl=0) for w in args.warps or [cuda_tile.CONFIG["warps"]]]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    quant = QuantConfig(method="hbllm", layout="row")
    out = []
    for i, (rows, cols) in enumerate(SHAPES.values()):
        codes, _, _ = quantize_shape(rows, cols, quant, seed=i)
        mods = packed_copies(codes, l2, "tile")
        x = torch.randn(args.tokens, cols, device="cuda", dtype=torch.float16)
        for cfg in configs:
            runs = [probe_run(mods, x, cfg) for _ in range(5)]
            best = min(runs, key=lambda r: r["span"])  # the least disturbed of five
            row = {"shape": f"{rows}x{cols}", "tokens": args.tokens, "config": cfg, **best,
                   "span_all": [r["span"] for r in runs]}
            out.append(row)
            steps = "  ".join(f"{k} {best[k][0]:.2f}/{best[k][1]:.2f}" for k in STEPS)
            print(f"{rows}x{cols} {cfg}: span {best['span']:.2f} us, skew "
                  f"{best['start skew']:.2f}; {steps} (median/max us, {best['GHz']:.2f} GHz)",
                  flush=True)
        del mods
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

"""Where the lookup-table GEMV's time goes: the kernel timed with parts of its work cut out.

    PYTHONPATH=$PWD python3 scripts/lut_anatomy.py [--json F]

Variants of ``hbllm.packed.cuda_lut.SOURCE`` (patched text, same launch; the cut variants compute
wrong outputs on purpose and only their time is used):
  full       the kernel as shipped
  loads      every word's table work replaced by one add of its bits (loads, tables, folds,
             epilogue stay): the memory side alone
  cached     every block's loads read one of the chunk's first two blocks again (L1/L2 hits, no DRAM
             stream): compute with the memory side nearly free
  nosal      the salient words' table work cut
  notables   the table build cut (tables hold whatever shared memory held)
CUDA-graph medians over enough layer copies to exceed twice the L2 (as scripts/bench_kernel.py),
HBLLM-row codes from tests/packed_synthetic.py (at most 12 salient columns a block), the three
LLaMA-2-7B shapes, 1 and 4 tokens, each shape's tuned launch config.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from hbllm.packed import cuda_lut  # noqa: E402
from hbllm.packed.format import linear_meta, pack_linear  # noqa: E402
from hbllm.packed.module import PackedLinear  # noqa: E402
from packed_synthetic import random_codes  # noqa: E402

WORD = "word(cur.s[i], cur.g[i], tm + (b * WPB + i) * 128, tmw + b * WPB + i, POS * 16, WC, z, zg, zs, zx);"
SAL = "word(sw, gw, tsl + (w - sw0) * 128, tsw + (w - sw0), SMAX * 128, SMAX, z, zg, zs, zx, tsn[w - sw0]);"
LOAD = "load(nxt, cb0 + min(b + 1, ncb - 1));"
PATCHES = {
    "full": [],
    "loads": [(WORD, "z[0] += (float)(cur.s[i] ^ cur.g[i]);"), (SAL, "z[0] += (float)(sw ^ gw);")],
    "cached": [(LOAD, "load(nxt, cb0 + ((b + 1) & 1) * (ncb > 1));")],
    "nosal": [(SAL, "")],
    "notables": [("  tables(tm, tmw,", "  if (0) tables(tm, tmw,"),
                 ("  tables(tsl, tsw,", "  if (0) tables(tsl, tsw,")],
}


def patched(src: str, variant: str, patches: dict = PATCHES) -> str:
    """``src`` with the patches of each ``+``-joined name of ``variant`` applied, in order."""
    for name in variant.split("+"):
        for old, new in patches[name]:
            assert src.count(old) == 1, (variant, old)
            src = src.replace(old, new)
    return src


def set_source(src: str, kernel=cuda_lut) -> None:
    """Compile ``kernel`` (an NVRTC kernel module of hbllm.packed) from ``src`` from now on."""
    kernel.SOURCE = src
    kernel._kernel.cache_clear()


def lut_layers(rows: int, cols: int, max_k: int, l2: int, gemv: str = "lut") -> list:
    """Copies (over twice the L2) of a packed HBLLM-row (rows, cols) layer of synthetic codes with
    up to ``max_k`` salient columns a block, on CUDA, forced to kernel ``gemv``."""
    from bench_kernel import copies  # (imports Triton: only where kernels are timed)
    codes = random_codes("row", rows, cols, max_k=max_k, seed=0)
    packed, meta = pack_linear(codes), linear_meta(codes)
    mods = copies(functools.partial(PackedLinear, packed, meta, device="cuda"), 8 << 20, l2)
    for m in mods:
        m.gemv = gemv
    return mods


def main() -> None:
    from bench_kernel import SHAPES, graph_time_us  # (imports Triton: only where kernels are timed)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    original = cuda_lut.SOURCE
    out = []
    for rows, cols in SHAPES.values():
        mods = lut_layers(rows, cols, 12, l2)
        for nt in (1, 4):
            x = torch.randn(nt, cols, device="cuda", dtype=torch.float16)
            row = {"shape": f"{rows}x{cols}", "tokens": nt, "config": cuda_lut.config(rows, cols, nt)}
            for name in PATCHES:
                set_source(patched(original, name))
                row[name] = graph_time_us(mods, x)
            set_source(original)
            out.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

"""Source variants of the lookup-table GEMV timed over a few launch configs.

    PYTHONPATH=$PWD python3 scripts/lut_variants.py [--json F]

Variants (patched text of ``hbllm.packed.cuda_lut.SOURCE``, composed left to right):
  base      the kernel as shipped
  pf2       two blocks' loads in flight instead of one
  unroll2   the block loop unrolled by 2
  lb5       ``__launch_bounds__(256, 5)`` (at most 48 registers: 5 blocks of 8 warps an SM)
Each at the three LLaMA-2-7B shapes, 1 and 4 tokens, on HBLLM-row codes from
tests/packed_synthetic.py (up to 40 salient columns a block); CUDA-graph medians as in
scripts/bench_kernel.py.
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
from bench_kernel import SHAPES, copies, graph_time_us  # noqa: E402

from hbllm.packed import cuda_lut  # noqa: E402
from hbllm.packed.format import linear_meta, pack_linear  # noqa: E402
from hbllm.packed.module import PackedLinear  # noqa: E402
from packed_synthetic import random_codes  # noqa: E402

LOAD = "load(nxt, cb0 + min(b + 1, ncb - 1));"
PATCHES = {
    "pf2": [("Blk cur, nxt;", "Blk cur, nxt, nx2;"),
            ("load(cur, cb0);", "load(cur, cb0); load(nxt, cb0 + min(1, ncb - 1));"),
            (LOAD, "load(nx2, cb0 + min(b + 2, ncb - 1));"), ("cur = nxt;", "cur = nxt; nxt = nx2;")],
    "unroll2": [("#pragma unroll 1\n  for (int b = 0;", "#pragma unroll 2\n  for (int b = 0;")],
    "lb5": [("__launch_bounds__(512)", "__launch_bounds__(256, 5)")],
}
VARIANTS = ("base", "pf2", "unroll2", "lb5", "pf2+unroll2", "pf2+unroll2+lb5")
CONFIGS = {1: [dict(warps=8, cb=2), dict(warps=8, cb=4), dict(warps=4, cb=2), dict(warps=4, cb=4)],
           4: [dict(warps=4, cb=1), dict(warps=8, cb=2)]}


def patched(src: str, variant: str) -> str:
    for name in variant.split("+"):
        for old, new in PATCHES.get(name, []):
            assert src.count(old) == 1, (variant, old)
            src = src.replace(old, new)
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    original, out = cuda_lut.SOURCE, []
    for rows, cols in SHAPES.values():
        codes = random_codes("row", rows, cols, max_k=40, seed=0)
        packed, meta = pack_linear(codes), linear_meta(codes)
        mods = copies(functools.partial(PackedLinear, packed, meta, device="cuda"), 8 << 20, l2)
        for m in mods:
            m.gemv = "lut"
        for nt, configs in CONFIGS.items():
            x = torch.randn(nt, cols, device="cuda", dtype=torch.float16)
            for variant in VARIANTS:
                cuda_lut.SOURCE = patched(original, variant)
                cuda_lut._kernel.cache_clear()
                times = []
                for cfg in configs:
                    cuda_lut.TUNED[(rows, cols, nt)] = cfg
                    times.append(graph_time_us(mods, x))
                out.append({"shape": f"{rows}x{cols}", "tokens": nt, "variant": variant,
                            "us": dict(zip((f"w{c['warps']}c{c['cb']}" for c in configs), times))})
                print(json.dumps(out[-1]), flush=True)
    cuda_lut.SOURCE = original
    cuda_lut._kernel.cache_clear()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

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
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lut_anatomy import lut_layers, patched, set_source  # noqa: E402

from hbllm.packed import cuda_lut  # noqa: E402

LOAD = "load(nxt, cb0 + min(b + 1, ncb - 1));"
PATCHES = {
    "base": [],
    "pf2": [("Blk cur, nxt;", "Blk cur, nxt, nx2;"),
            ("load(cur, cb0);", "load(cur, cb0); load(nxt, cb0 + min(1, ncb - 1));"),
            (LOAD, "load(nx2, cb0 + min(b + 2, ncb - 1));"), ("cur = nxt;", "cur = nxt; nxt = nx2;")],
    "unroll2": [("#pragma unroll 1\n  for (int b = 0;", "#pragma unroll 2\n  for (int b = 0;")],
    "lb5": [("__launch_bounds__(512)", "__launch_bounds__(256, 5)")],
}
VARIANTS = ("base", "pf2", "unroll2", "lb5", "pf2+unroll2", "pf2+unroll2+lb5")
CONFIGS = {1: [dict(warps=8, cb=2), dict(warps=8, cb=4), dict(warps=4, cb=2), dict(warps=4, cb=4)],
           4: [dict(warps=4, cb=1), dict(warps=8, cb=2)]}


def main() -> None:
    from bench_kernel import SHAPES, graph_time_us  # (imports Triton: only where kernels are timed)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    original, out = cuda_lut.SOURCE, []
    for rows, cols in SHAPES.values():
        mods = lut_layers(rows, cols, 40, l2)
        for nt, configs in CONFIGS.items():
            x = torch.randn(nt, cols, device="cuda", dtype=torch.float16)
            for variant in VARIANTS:
                set_source(patched(original, variant, PATCHES))
                times = []
                for cfg in configs:
                    cuda_lut.TUNED[(rows, cols, nt)] = cfg
                    times.append(graph_time_us(mods, x))
                out.append({"shape": f"{rows}x{cols}", "tokens": nt, "variant": variant,
                            "us": dict(zip((f"w{c['warps']}c{c['cb']}" for c in configs), times))})
                print(json.dumps(out[-1]), flush=True)
    set_source(original)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

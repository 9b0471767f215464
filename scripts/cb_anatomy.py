"""Where the codebook GEMV's time goes: the kernel timed with parts of its work cut out.

    PYTHONPATH=$PWD python3 scripts/cb_anatomy.py [--json F]

Variants of ``hbllm.packed.cuda_codebook.SOURCE`` (patched text, same launch; the cut variants
compute wrong outputs on purpose and only their time is used), ``+`` joins cuts:
  full      the kernel as shipped
  noloop    no block of the chunk is computed (launch, input staging, first loads, epilogue)
  nodecode  a fragment register is its code word mixed with one codebook word (1 instruction
            instead of a byte permute, a multiply-add and a share of a mask and a shift)
  nomma     the MMAs replaced by one add of two fragment registers
  cached    every block after the first two reads one of the chunk's first two blocks again
            (L1/L2 hits, no DRAM stream)
  nostage   the chunk's main inputs are not staged (shared memory holds whatever it held)
  nosplit   each chunk writes its partial output straight to y (no float32 workspace, fence,
            counter or last-block pass)
CUDA-graph medians over enough layer copies to exceed twice the L2 (as scripts/bench_kernel.py),
HBLLM-row codes from tests/packed_synthetic.py (at most 12 salient columns a block), the three
LLaMA-2-7B shapes, 1, 8 and 16 tokens, each shape's tuned launch config.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
from lut_anatomy import lut_layers, patched, set_source  # noqa: E402

from hbllm.packed import cuda_codebook  # noqa: E402

DECODE = "\n".join(f"    a[{k // 4}][{k % 4}] = perm(b{k % 2}, {sel});" for k, sel in enumerate((
    "m0 * 0x11u + 0x0404u", "madhi(m2, 0x44000000u, 0x0404u)", "madhi(m4, 0x44000000u, 0x0404u)",
    "madhi(m6, 0x44000000u, 0x0404u)", "madhi(m0, 0x110000u, 0x0404u)", "madhi(m2, k10, 0x0404u)",
    "madhi(m4, k10, 0x0404u)", "madhi(m6, k10, 0x0404u)")))
NEXT = "(b + ST - 1) % ST, cb0 + b + ST - 1);"
PATCHES = {
    "full": [],
    "noloop": [("for (int b = 0; b < ncb; ++b) {", "for (int b = 0; b < 0 * ncb; ++b) {")],
    "nodecode": [(DECODE, "\n".join(f"    a[{k // 4}][{k % 4}] = w ^ b{k % 2}.{'xy'[k // 4]};"
                                    for k in range(8)))],
    "nomma": [("      mma(acc[v][h], a[0], bz[h].x, bz[h].y);\n      mma(acc[v][h], a[1], bz[h].z, bz[h].w);",
               "      acc[v][h][0] += __uint_as_float((a[0][0] ^ a[1][3]) & 0x3c003c00u);")],
    "cached": [(f"stage_main({NEXT}", "stage_main((b + ST - 1) % ST, cb0 + ((b + ST - 1) & 1) * (ncb > 1));"),
               (f"stage_sal({NEXT}", "stage_sal((b + ST - 1) % ST, cb0 + ((b + ST - 1) & 1) * (ncb > 1));")],
    "nostage": [("items = N * PER,", "items = 0 * N * PER,")],
    "nosplit": [("if (gridDim.y == 1) {", "if (true) {")],
}


def main() -> None:
    from bench_kernel import SHAPES, graph_time_us  # (imports Triton: only where kernels are timed)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", nargs="*", default=list(PATCHES))
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    original = cuda_codebook.SOURCE
    out = []
    for rows, cols in SHAPES.values():
        mods = lut_layers(rows, cols, 12, l2, "cb")
        for nt in (1, 8, 16):
            x = torch.randn(nt, cols, device="cuda", dtype=torch.float16)
            row = {"shape": f"{rows}x{cols}", "tokens": nt,
                   "config": cuda_codebook.config(rows, cols, nt)}
            for name in args.variants:
                set_source(patched(original, name, PATCHES), cuda_codebook)
                row[name] = graph_time_us(mods, x)
            set_source(original, cuda_codebook)
            out.append(row)
            print(json.dumps(row), flush=True)
        del mods
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

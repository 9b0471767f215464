"""A/B packed-kernel sources on the GPU: the bench's layers, timed with each source in turn.

    PYTHONPATH=$PWD python3 scripts/kernel_variants.py MODULE FILE [FILE ...] [--tokens 1 4 8]
        [--rounds 3] [--json F]

MODULE is an NVRTC kernel module of hbllm/packed (cuda_tile, cuda_codebook, cuda_lut, cuda_mma);
each FILE holds a full ``SOURCE`` text for it, e.g. two commits' versions written by
``python3 -c "from hbllm.packed import cuda_tile; print(cuda_tile.SOURCE)" > a.cu``. For each
LLaMA-2-7B shape, the HBLLM-row layer of ``bench_kernel.py`` (same random weight and seed) is
copied to twice the L2 in bytes and forced to MODULE's kernel; at each token count the variants
are timed in ``--rounds`` interleaved rounds (CUDA-graph medians as ``bench_kernel.py``; the
median over rounds is reported, so drift hits every variant alike), beside cuBLAS fp16. Each
variant's output is checked against dequantize-then-matmul (float64): ``rel_err``.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from hbllm.config import QuantConfig  # noqa: E402
from hbllm.packed import nvrtc  # noqa: E402
from hbllm.packed.codes import dequantize  # noqa: E402

GEMV = {"cuda_tile": "tile", "cuda_codebook": "cb", "cuda_lut": "lut", "cuda_mma": "mma"}


def main() -> None:
    from bench_kernel import SHAPES, fp16_copies, graph_time_us, packed_copies, quantize_shape, rel_err
    from lut_anatomy import set_source
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", choices=sorted(GEMV))
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    kernel = importlib.import_module(f"hbllm.packed.{args.module}")
    sources = {Path(f).name: Path(f).read_text() for f in args.files}
    compiled = functools.cache(nvrtc.compile_kernel)  # a variant compiles once, however often used
    nvrtc.compile_kernel = compiled
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    quant = QuantConfig(method="hbllm", layout="row")
    out = []
    for i, (rows, cols) in enumerate(SHAPES.values()):
        codes, _, _ = quantize_shape(rows, cols, quant, seed=i)
        mods = packed_copies(codes, l2, GEMV[args.module])
        w = dequantize(codes).cuda().double()
        dense = fp16_copies(rows, cols, l2)
        for nt in args.tokens:
            x = torch.randn(nt, cols, device="cuda", dtype=torch.float16)
            ref = x.double() @ w.T
            row = {"shape": f"{rows}x{cols}", "tokens": nt,
                   "fp16_us": graph_time_us(dense, x), "us": {}, "rel_err": {}}
            times = {name: [] for name in sources}
            for _ in range(args.rounds):
                for name, src in sources.items():
                    set_source(src, kernel)
                    times[name].append(graph_time_us(mods, x))
            for name, src in sources.items():
                set_source(src, kernel)
                row["us"][name] = statistics.median(times[name])
                row["rel_err"][name] = rel_err(mods[0](x), ref)
            row["rounds"] = times
            out.append(row)
            print(json.dumps({k: row[k] for k in ("shape", "tokens", "fp16_us", "us", "rel_err")}),
                  flush=True)
        del mods, dense
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "module": args.module,
                       "files": args.files, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

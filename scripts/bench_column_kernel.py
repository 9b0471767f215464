"""Time GPTQ's column loop (hbllm.quant.gptq.column_loop) on LLaMA-2-7B shapes: the tensor-
operation loop against the Triton kernel at several tile configs (rows per program, warps).

    python scripts/bench_column_kernel.py --json bench_column_kernel.json

Inputs are synthetic (random weight, ``U`` from a random Hessian), 3-bit per-row grids; the time
is the loop alone (median of ``--repeat``, CUDA synchronized), per shape and backend.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from hbllm.quant import column_kernel, gptq
from hbllm.quant.block_loop import upper_inverse_cholesky
from hbllm.quant.uniform import minmax_params

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def problem(rows: int, cols: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(rows, cols, device=device, generator=g)
    x = torch.randn(2 * cols, cols, device=device, generator=g)
    U = upper_inverse_cholesky(x.T @ x / (2 * cols), 0.01)[0]
    scale, zero = minmax_params(w, 7, sym=False)
    return w, U, lambda i1, i2: gptq.ColumnGrids(scale.expand(rows, i2 - i1), zero.expand(rows, i2 - i1), 7)


def loop(w, U, grids, backend: str):
    """One column loop over a copy of ``w``."""
    return gptq.column_loop(w.clone(), U, 128, grids, backend=backend)


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--configs", default="8x2,16x4,32x4,32x8,64x8", help="ROWSxWARPS,...")
    args = p.parse_args()
    rows_out = []
    for R, C in SHAPES:
        w, U, grids = problem(R, C, "cuda")
        ref = loop(w, U, grids, "torch")
        t_torch = timed(functools.partial(loop, w, U, grids, "torch"), args.repeat)
        rows_out.append(dict(shape=[R, C], backend="torch", seconds=t_torch))
        print(f"{R}x{C} torch {t_torch * 1e3:8.1f} ms", flush=True)
        for spec in args.configs.split(","):
            br, nw = map(int, spec.split("x"))
            column_kernel.BLOCK_ROWS, column_kernel.NUM_WARPS = br, nw
            same = all(torch.equal(a, b) for a, b in zip(ref, loop(w, U, grids, "triton")))
            t = timed(functools.partial(loop, w, U, grids, "triton"), args.repeat)
            rows_out.append(dict(shape=[R, C], backend="triton", block_rows=br, warps=nw, seconds=t,
                                 identical=same))
            print(f"{R}x{C} triton {br}x{nw} {t * 1e3:8.1f} ms  identical={same}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()

"""The floor of a packed linear in bench_kernel's harness: a kernel that only reads the layer's bytes.

    PYTHONPATH=$PWD python3 scripts/stream_floor.py [--json F]

For each LLaMA-2-7B shape, the HBLLM-row layer of ``bench_kernel.py`` (same random weight and
seed) gives the byte count of its packed buffers. A kernel then reads exactly that many bytes
(coalesced 16-byte loads, ``U`` in flight a thread, a grid-stride loop over ``k`` blocks an SM)
and, like a GEMV, waits for the kernel before it (``dep_wait``), reads ``x`` and writes the ``R``
outputs. It computes nothing else, so no packed kernel can beat it in this harness. ``empty``
reads no weight bytes: the fixed cost of a launch that reads x and writes y. Timed as
``bench_kernel.graph_time_us`` (CUDA-graph medians over copies with twice the L2 in bytes), with
programmatic dependent launch (trigger at the start: the next copy's loads may overlap this one)
and without, best over the launch configs, beside cuBLAS fp16 and the batch-1 target time
(fp16 / 2.5).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from hbllm.config import QuantConfig  # noqa: E402
from hbllm.packed import nvrtc  # noqa: E402
from hbllm.packed.format import linear_meta, pack_linear  # noqa: E402
from hbllm.packed.module import PackedLinear  # noqa: E402

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(TPB) NAME(const uint4* __restrict__ w, int n16,
    const u16* __restrict__ x, u16* __restrict__ y, int R, int C) {
#if TRIG
  dep_launch();
#endif
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * TPB;
  long long i = (long long)blockIdx.x * TPB + threadIdx.x;
  for (; i + (U - 1) * stride < n16; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = w[i + u * stride];
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = w[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  dep_wait();
  // the loads cannot be dropped: the output depends on what they read
  for (int r = blockIdx.x * TPB + threadIdx.x; r < R; r += (int)stride)
    y[r] = x[r % C] ^ (u16)(acc == 0x9e3779b9u);
}
"""
CONFIGS = list(itertools.product((1, 2, 4), (256, 512, 1024), (2, 4, 8)))  # blocks/SM, TPB, U


@functools.cache
def _kernel(tpb: int, u: int, trig: int):
    name = f"hbllm_stream_{tpb}_{u}_t{trig}"
    return nvrtc.compile_kernel(SOURCE, name, torch.cuda.current_device(), DT=0, TPB=tpb, U=u,
                                TRIG=trig)


class Stream(torch.nn.Module):
    """Reads ``nbytes`` of its own buffer, then x; writes (1, rows) (module docstring)."""

    grid, tpb, u, pdl = 132, 256, 4, True

    def __init__(self, rows: int, nbytes: int):
        super().__init__()
        self.rows = rows
        self.w = torch.randint(-2**31, 2**31 - 1, (max(nbytes // 4, 4),), dtype=torch.int32,
                               device="cuda")
        self.n16 = nbytes // 16
        self.launched = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(1, self.rows, device=x.device, dtype=x.dtype)
        kernel = _kernel(self.tpb, self.u, int(self.pdl))
        args = [self.w, self.n16, x, y, self.rows, x.shape[-1]]
        if self.pdl and self.launched and nvrtc.pdl_supported(torch.cuda.current_device()):
            nvrtc.launch_dependent(kernel, (self.grid, 1, 1), (self.tpb, 1, 1), args, 0)
        else:
            kernel(grid=(self.grid, 1, 1), block=(self.tpb, 1, 1), shared_mem=0, args=args)
        self.launched = True
        return y


def best(mods, x, sms: int, pdl: bool) -> dict:
    from bench_kernel import graph_time_us
    runs = []
    for k, tpb, u in CONFIGS:
        if k * tpb > 2048:
            continue
        for m in mods:
            m.grid, m.tpb, m.u, m.pdl, m.launched = k * sms, tpb, u, pdl, False
        runs.append({"blocks_per_sm": k, "tpb": tpb, "u": u, "us": graph_time_us(mods, x)})
    return min(runs, key=lambda r: r["us"])


def main() -> None:
    from bench_kernel import SHAPES, copies, fp16_copies, graph_time_us, module_bytes, quantize_shape
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2, sms = props.L2_cache_size, props.multi_processor_count
    quant = QuantConfig(method="hbllm", layout="row")
    out = []
    for i, (label, (rows, cols)) in enumerate(SHAPES.items()):
        codes, _, _ = quantize_shape(rows, cols, quant, seed=i)
        nbytes = module_bytes(PackedLinear(pack_linear(codes), linear_meta(codes), device="cuda"))
        x = torch.randn(1, cols, device="cuda", dtype=torch.float16)
        w16 = fp16_copies(rows, cols, l2)
        fp16 = graph_time_us(w16, x)
        del w16
        row = {"shape": f"{rows}x{cols}", "layer": label, "packed_MB": nbytes / 1e6,
               "fp16_us": fp16, "target_us": fp16 / 2.5}
        mods = copies(functools.partial(Stream, rows, nbytes), nbytes, l2)
        row["stream_pdl"] = best(mods, x, sms, True)
        row["stream_plain"] = best(mods, x, sms, False)
        empty = [Stream(rows, 0) for _ in range(len(mods))]
        row["empty_pdl"] = best(empty, x, sms, True)
        row["empty_plain"] = best(empty, x, sms, False)
        row["stream_pdl_TBps"] = nbytes / row["stream_pdl"]["us"] * 1e-6
        out.append(row)
        print(json.dumps(row), flush=True)
        del mods, empty
        torch.cuda.empty_cache()
    print(f"\n{'shape':<12}{'MB':>7}{'fp16':>7}{'2.5x':>7}{'stream':>8}{'no PDL':>8}"
          f"{'empty':>7}{'no PDL':>8}  (us)")
    for r in out:
        print(f"{r['shape']:<12}{r['packed_MB']:7.2f}{r['fp16_us']:7.1f}{r['target_us']:7.1f}"
              f"{r['stream_pdl']['us']:8.1f}{r['stream_plain']['us']:8.1f}"
              f"{r['empty_pdl']['us']:7.1f}{r['empty_plain']['us']:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "sms": sms, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

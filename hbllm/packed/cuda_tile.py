"""Packed linear for decoding (1-8 fp16 tokens a launch): the codebook decode of
:mod:`cuda_codebook` with one row tile a thread block and no split-K workspace. NVRTC, at first use.

A block owns one row tile (32 band slots, two MMA tiles of 16) and stages the whole input in
shared memory once (row layout: the Haar domain, the salient columns gathered in slot order). Its
warps split the layer's quantization blocks into contiguous ranges; a warp walks its range with
the next block's codes, codebooks and first salient word loaded into registers while it decodes
the current one (one ``mma.m16n8k16`` a 16 x 16 piece, ``cuda_codebook.DECODE``). The warps then
add their partial outputs in shared memory and the block writes its 32 rows: no float32
workspace, no fence, no tile counter, one launch a call. The price is the grid: one block a row
tile (128 at 4096 rows), so the layer's columns are spread over the warps of a block rather than
over blocks. Reads the buffers of :func:`hbllm.packed.codebook.build` (shared with
:mod:`cuda_codebook`: built once a layer).
"""
from __future__ import annotations

import functools

import torch

from . import cuda_codebook, nvrtc

MAX_TOKENS = 8
# Launch config: warps a block (splitting the quantization blocks), programmatic dependent
# launch (``pdl``, nvrtc.PDL: 1 the next kernel may launch from the start of this one, 2 after
# its block loop, 3 after its first block). TUNED per (rows, cols, token bucket 1/4/8), as
# ``bench_kernel.py --tune tile`` prints it (H200, 2026-11-29:
# experiments/benchmarks/raw/kernel_tile_2026-11-29.json); CONFIG, the fallback, won 7 of 9.
CONFIG = {"warps": 16, "pdl": 3}
BUCKETS = (1, 4, 8)
TUNED: dict[tuple, dict] = {
    (4096, 4096, 1): {"warps": 16, "pdl": 3},
    (4096, 4096, 4): {"warps": 16, "pdl": 3},
    (4096, 4096, 8): {"warps": 16, "pdl": 3},
    (11008, 4096, 1): {"warps": 16, "pdl": 3},
    (11008, 4096, 4): {"warps": 16, "pdl": 3},
    (11008, 4096, 8): {"warps": 16, "pdl": 3},
    (4096, 11008, 1): {"warps": 16, "pdl": 3},
    (4096, 11008, 4): {"warps": 16, "pdl": 2},
    (4096, 11008, 8): {"warps": 16, "pdl": 2},
}

SOURCE = r"""
#define WPB (BS / 32)           // words per quantization block
#define GPB (ROW ? 2 : 1)       // main codebooks (statistics groups) per block
#define WPGR (WPB / GPB)        // main words per group
#define NCP (WPB / 2)           // 16-byte pieces of a lane's main codes per block
#define NTILE 1
""" + cuda_codebook.DECODE + r"""
struct Blk {      // a lane's share of one quantization block
  uint4 c[NCP];   // main codes (words 2i, 2i + 1 as A, B, A, B)
  uint4 bm;       // main codebooks (row layout: two groups)
  uint2 bs, s0;   // salient codebook, first salient word
  int f0, f1;     // salient words f0 .. f1 - 1
};
extern "C" __global__ void __launch_bounds__(512) NAME(PACKED_ARGS,
    const int* __restrict__ sfirst, const uint4* __restrict__ cbm, const uint2* __restrict__ bkm,
    const uint2* __restrict__ cbs, const uint2* __restrict__ bks) {
  extern __shared__ float4 smem4[];
  const int W = C >> 5, ZC = (W | 1) * 32, ZSC = (SW | 1) * 32;  // halves per token row: odd
                                                                 // counts of 64-byte words
  u16* zm = reinterpret_cast<u16*>(smem4);  // [N][ZC] main inputs
  u16* zs = zm + N * ZC;                    // [N][ZSC] salient inputs, slot order
  float* fin = reinterpret_cast<float*>(zs + N * ZSC);  // [warps][8 tokens][32 rows]
  const float c = (float)cd;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3, t = blockIdx.x;
  const int a0 = (int)((long long)NB * wid / nw), a1 = (int)((long long)NB * (wid + 1) / nw);
  auto load = [&](Blk& k, int a) {
#pragma unroll
    for (int i = 0; i < NCP; ++i) k.c[i] = cbm[((size_t)t * (W / 2) + a * NCP + i) * 32 + lane];
#if GPB == 2
    k.bm = reinterpret_cast<const uint4*>(bkm)[((size_t)t * NB + a) * 32 + lane];
#else
    const uint2 b = bkm[((size_t)t * NB + a) * 32 + lane];
    k.bm = make_uint4(b.x, b.y, 0u, 0u);
#endif
    k.bs = bks[((size_t)t * NB + a) * 32 + lane];
    k.f0 = sfirst[a];
    k.f1 = sfirst[a + 1];
    k.s0 = k.f0 < k.f1 ? cbs[((size_t)t * SW + k.f0) * 32 + lane] : make_uint2(0u, 0u);
  };
#if TRIG == 1
  dep_launch();
#endif
  Blk A, B;
  if (a0 < a1) load(A, a0);  // the first block in flight while the inputs are staged
  dep_wait();                // x and y belong to the kernels before this one
  // main inputs: 8 columns (16 bytes) of a token an item (stage8: Haar domain or kept columns)
  const int per = C / 8, items = N * per;
#pragma unroll 4
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int n = it / per, j0 = (it - n * per) * 8;
    stage8(zm + n * ZC, *reinterpret_cast<const uint4*>(x + (size_t)n * C + j0), j0, keep + j0, c);
  }
  for (int j = threadIdx.x; j < SW * 32; j += blockDim.x) {  // salient slots (-1: padding)
    const int col = sc[j];
    for (int n = 0; n < N; ++n) zs[n * ZSC + j] = col >= 0 ? x[(size_t)n * C + col] : (u16)0;
  }
  __syncthreads();
  float am[2][NTILE][4], as[2][NTILE][4];  // [MMA tile][n-tile][fragment], main and salient
#pragma unroll
  for (int v = 0; v < 2; ++v)
#pragma unroll
    for (int j = 0; j < 4; ++j) am[v][0][j] = as[v][0][j] = 0.f;
  const int zo = min(g, N - 1);  // this lane's token row of the B fragments
  const u16* zr = zm + zo * ZC + q * 8;
  const u16* zsr = zs + zo * ZSC + q * 8;
  auto run = [&](const Blk& k, int a) {
#pragma unroll
    for (int j = 0; j < GPB; ++j) {
      uint2 bk[4];
      books(j ? make_uint2(k.bm.z, k.bm.w) : make_uint2(k.bm.x, k.bm.y), g, bk);
#pragma unroll
      for (int i = j * WPGR; i < (j + 1) * WPGR; ++i) {
        const uint4 bz = *reinterpret_cast<const uint4*>(zr + (a * WPB + i) * 32);
        const uint4 cw = k.c[i / 2];
        word(am, i % 2 ? cw.z : cw.x, i % 2 ? cw.w : cw.y, &bz, bk);
      }
    }
    if (k.f0 < k.f1) {
      uint2 bk[4];
      books(k.bs, g, bk);
      for (int w = k.f0; w < k.f1; ++w) {
        const uint2 cw = w == k.f0 ? k.s0 : cbs[((size_t)t * SW + w) * 32 + lane];
        const uint4 bz = *reinterpret_cast<const uint4*>(zsr + w * 32);
        word(as, cw.x, cw.y, &bz, bk);
      }
    }
  };
  // two blocks a step: B is loaded while A is decoded and the reverse (no register copies)
  int a = a0;
#pragma unroll 1
  for (; a + 1 < a1; a += 2) {
    load(B, a + 1);
    run(A, a);
#if TRIG == 3
    if (a == a0) dep_launch();
#endif
    if (a + 2 < a1) load(A, a + 2);
    run(B, a + 1);
  }
  if (a < a1) run(A, a);
#if TRIG == 2
  dep_launch();
#elif TRIG == 3
  if (a1 - a0 < 2) dep_launch();  // warps that took no step above
#endif
  // fragments -> this warp's partial outputs: element j is row g + 8 (j >> 1) of the MMA tile,
  // token 2q + (j & 1); salient (and col-layout main) tiles are the low (A) and high (B) rows of
  // pairs g + 8 (j >> 1), output rows 2p, 2p + 1. Row layout: the main rows, then the salient
  // pairs added (one writer per (row, token) in each step).
  float* fw = fin + wid * 8 * 32;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = 2 * q + (j & 1), p = g + 8 * (j >> 1);
    if (n < N) {
#if ROW
      fw[n * 32 + p] = am[0][0][j];
      fw[n * 32 + 16 + p] = am[1][0][j];
#else
      const float lo = am[0][0][j] + as[0][0][j], hi = am[1][0][j] + as[1][0][j];
      fw[n * 32 + 2 * p] = c * (lo + hi);
      fw[n * 32 + 2 * p + 1] = c * (lo - hi);
#endif
    }
  }
#if ROW
  __syncwarp();
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = 2 * q + (j & 1), p = g + 8 * (j >> 1);
    if (n < N) {
      const float lo = as[0][0][j], hi = as[1][0][j];
      fw[n * 32 + 2 * p] += c * (lo + hi);
      fw[n * 32 + 2 * p + 1] += c * (lo - hi);
    }
  }
#endif
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * N; i += blockDim.x) {  // the warps' partials of (row, token)
    const int r = i & 31, n = i >> 5, row = 32 * t + r;
    float s = 0.f;
    for (int w = 0; w < nw; ++w) s += fin[(w * 8 + n) * 32 + r];
    if (row < R) y[(size_t)n * R + row] = st(s);
  }
}
"""


def macros(row: bool, bs: int, trig: int = 1) -> dict:
    """Compile-time constants: layout, blocksize, where the next kernel may launch
    (:data:`CONFIG`'s ``pdl``)."""
    return dict(ROW=int(row), DT=0, BS=bs, TRIG=trig)


@functools.cache
def _kernel(row: bool, bs: int, device: int, trig: int = 1):
    name = f"hbllm_tile_{'row' if row else 'col'}_{bs}_t{trig}"
    return nvrtc.compile_kernel(SOURCE, name, device, **macros(row, bs, trig))


@functools.cache
def available() -> bool:
    """Whether the NVRTC kernel compiles here (CUDA, PyTorch >= 2.9, sm_80 or newer)."""
    return nvrtc.compiles(lambda: _kernel(True, 128, torch.cuda.current_device()), 8)


def config(rows: int, cols: int, tokens: int) -> dict:
    """Launch config of a (rows, cols) layer at ``tokens`` (1-8) tokens a launch: :data:`TUNED`
    at its bucket, else :data:`CONFIG`."""
    return TUNED.get((rows, cols, next(b for b in BUCKETS if tokens <= b)), CONFIG)


def smem_bytes(cols: int, sal_words: int, tokens: int, warps: int) -> int:
    """Shared memory of a launch: the staged inputs of ``tokens`` tokens and the warps' partial
    outputs."""
    halves = (((cols // 32) | 1) + (sal_words | 1)) * 32
    return 2 * tokens * halves + 4 * warps * 8 * 32


def tokens_a_launch(cols: int, sal_words: int, warps: int, device: int) -> int:
    """The most tokens (8, 4, 2 or 1) whose inputs fit the device's shared memory; 0: none."""
    return next((n for n in (8, 4, 2, 1)
                 if smem_bytes(cols, sal_words, n, warps) <= nvrtc.smem_limit(device)), 0)


def fits(cols: int, sal_words: int, device: torch.device) -> bool:
    """Whether one token's inputs fit shared memory (with the most warps a block)."""
    return tokens_a_launch(cols, sal_words, 16, nvrtc.device_index(device)) > 0


def gemv(x: torch.Tensor, rt: dict[str, torch.Tensor], meta: dict, c: float,
         scratch: dict) -> torch.Tensor:
    """y (N, R) = x (N, C) W^T for fp16 x (N, C) contiguous on CUDA, up to 8 tokens a launch
    (fewer where their inputs do not fit shared memory). ``scratch``: a dict the caller keeps
    per layer (the codebook buffers)."""
    n, cols = x.shape
    cfg = config(meta["rows"], cols, min(n, MAX_TOKENS))
    warps = cfg["warps"]
    if not 1 <= warps <= 16:
        raise ValueError(f"tile GEMV config {cfg}: warps must be 1-16 (512 threads a block)")
    device = nvrtc.device_index(x.device)
    sal_words = rt["sal_wgrp"].numel()
    nt = tokens_a_launch(cols, sal_words, warps, device)
    if nt == 0:
        raise ValueError(f"tile GEMV: the inputs of one token ({cols} columns, {sal_words} "
                         "salient words) do not fit shared memory; use the codebook GEMV")
    buf = cuda_codebook.buffers(rt, meta, scratch)
    pdl = cfg.get("pdl", 0)
    kernel = _kernel(meta["layout"] == "row", meta["blocksize"], device, max(pdl, 1))
    grid = ((meta["rows"] + 31) // 32, 1, 1)
    after_first = nvrtc.settled(scratch, ("tile", x.device))
    return nvrtc.launch(kernel, x, rt, meta, c, nt, grid, 32 * warps,
                        smem_bytes(cols, sal_words, nt, warps),
                        extra=[rt["sal_first"], buf["cb_main"], buf["book_main"], buf["cb_sal"],
                               buf["book_sal"]], pdl=pdl > 0 and after_first)

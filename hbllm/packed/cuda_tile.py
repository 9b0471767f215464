"""Packed linear for decoding (1-8 fp16 tokens a launch): the codebook decode of
:mod:`cuda_codebook` with whole row tiles a thread block and no split-K workspace. NVRTC, at
first use.

The warps of a block split the quantization blocks into contiguous ranges, and each warp stages
the inputs of its own range in shared memory (row layout: the Haar domain, the salient columns
gathered in slot order), so no barrier holds it before it decodes. The block then owns row tiles
(32 band slots, two MMA tiles of 16) ``blockIdx.x``, ``+ gridDim.x``, ...: a persistent grid of
as many blocks as the GPU holds at once, its staged inputs serving every tile. A warp walks its
range with the next block's codes, codebooks and first two salient words loaded into registers
while it decodes the current one (one ``mma.m16n8k16`` a 16 x 16 piece,
``cuda_codebook.DECODE``). At the end of a tile the warps add their partial outputs in shared
memory (two buffers, alternating: one barrier a tile) and the block writes the tile's 32 rows:
no float32 workspace, no fence, no tile counter, one launch a call, the same bits every call.
Reads the buffers of :func:`hbllm.packed.codebook.build` (shared with :mod:`cuda_codebook`:
built once a layer).

Built with ``PROBE`` (``scripts/tile_timeline.py``), the kernel's warps stamp their clock at
each step: where a launch spends its time.
"""
from __future__ import annotations

import functools

import torch

from . import cuda_codebook, nvrtc

MAX_TOKENS = 8
MAX_WARPS = 16  # 512 threads a block: the kernel's launch bound
# Launch config: warps a block (splitting the quantization blocks), programmatic dependent
# launch (``pdl``, nvrtc.PDL: 1 the next kernel may launch from the start of this one, 2 after
# its block loop, 3 after its first block). TUNED per (rows, cols, token bucket 1/4/8), as
# ``bench_kernel.py --tune tile`` prints it: empty, as CONFIG was within 0.1 us of the best at
# every 7B shape and bucket (H200, 2026-11-29: experiments/benchmarks/raw/
# kernel_tile_warp_staging_tune_2026-11-29.json; 24 and 32 warps, at 64 registers without the
# register double buffer, only tied: not kept).
CONFIG = {"warps": 16, "pdl": 3}
BUCKETS = (1, 4, 8)
TUNED: dict[tuple, dict] = {}

SOURCE = r"""
#define WPB (BS / 32)           // words per quantization block
#define GPB (ROW ? 2 : 1)       // main codebooks (statistics groups) per block
#define WPGR (WPB / GPB)        // main words per group
#define NCP (WPB / 2)           // 16-byte pieces of a lane's main codes per block
#define NTILE 1
#define SPRE 8                  // salient words a warp gathers the inputs of at once
""" + cuda_codebook.DECODE + r"""
struct Blk {      // a lane's share of one quantization block
  uint4 c[NCP];   // main codes (words 2i, 2i + 1 as A, B, A, B)
  uint4 bm;       // main codebooks (row layout: two groups)
  uint2 bs, s0, s1;  // salient codebook, first two salient words
  int f0, f1;     // salient words f0 .. f1 - 1
};
struct Cur {      // a unit: quantization block a of row tile t, and this lane's offsets in
  int t, a;       // the buffers: codes (uint4), codebooks, the tile's salient words (uint2)
  int oc, ob, os;
};
// PROBE (scripts/tile_timeline.py): a warp's lane 0 stamps its SM clock at steps 0-6 into
// prb[(block * warps + warp) * 16 + step], and the global timer (ns) at its start and end into
// slots 7 and 8
#ifdef PROBE
__device__ __forceinline__ long long ns_now() {
  long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}
#define SLOT(k) prb[(blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 16 + (k)]
#define STAMP(k) if ((threadIdx.x & 31) == 0) SLOT(k) = clock64()
#define PROBE_ARG , long long* __restrict__ prb
#else
#define STAMP(k)
#define PROBE_ARG
#endif
extern "C" __global__ void __launch_bounds__(512) NAME(PACKED_ARGS,
    const int* __restrict__ sfirst, const uint4* __restrict__ cbm, const uint2* __restrict__ bkm,
    const uint2* __restrict__ cbs, const uint2* __restrict__ bks PROBE_ARG) {
#ifdef PROBE
  if ((threadIdx.x & 31) == 0) SLOT(7) = ns_now();
#endif
  STAMP(0);
  extern __shared__ float4 smem4[];
  const int W = C >> 5, ZC = (W | 1) * 32, ZSC = (SW | 1) * 32;  // halves per token row: odd
                                                                 // counts of 64-byte words
  const int T = (R + 31) >> 5;  // row tiles
  u16* zm = reinterpret_cast<u16*>(smem4);  // [N][ZC] main inputs
  u16* zs = zm + N * ZC;                    // [N][ZSC] salient inputs, slot order
  float* fin = reinterpret_cast<float*>(zs + N * ZSC);  // [2 tiles][warps][N tokens][32 rows]
  int* sf = reinterpret_cast<int*>(fin + 2 * (blockDim.x >> 5) * N * 32);  // [NB] sfirst
  const float c = (float)cd;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  // this warp's units: blocks a0 .. a1 - 1 of every tile it visits (blockIdx.x, + gridDim.x,
  // ...), walked by cursors (t, a); t >= T: past the last
  const int a0 = (int)((long long)NB * wid / nw), a1 = (int)((long long)NB * (wid + 1) / nw);
  const int t0 = a0 < a1 ? (int)blockIdx.x : T;
  const int GX = (int)gridDim.x, nu = a1 - a0;
  // the next unit: offsets move by one block, or to block a0 of tile t + GX
  auto next = [&](Cur& u) {
    const bool wrap = ++u.a == a1;
    u.a = wrap ? a0 : u.a;
    u.t += wrap ? GX : 0;
    u.oc += wrap ? (GX * (W / 2) - (nu - 1) * NCP) * 32 : NCP * 32;
    u.ob += wrap ? (GX * NB - (nu - 1)) * 32 : 32;
    u.os += wrap ? GX * SW * 32 : 0;
  };
  // a unit's loads: codes and codebooks (no dependence), then its salient words' range (from
  // shared memory: a global read there would hold the warp for a round trip before the first
  // salient word could be requested)
  auto load_main = [&](Blk& k, const Cur& u) {
#pragma unroll
    for (int i = 0; i < NCP; ++i) k.c[i] = cbm[u.oc + i * 32];
#if GPB == 2
    k.bm = reinterpret_cast<const uint4*>(bkm)[u.ob];
#else
    const uint2 b = bkm[u.ob];
    k.bm = make_uint4(b.x, b.y, 0u, 0u);
#endif
    k.bs = bks[u.ob];
  };
  Cur cur;  // the unit A holds
  cur.t = t0;
  cur.a = a0;
  cur.oc = (t0 * (W / 2) + a0 * NCP) * 32 + lane;
  cur.ob = (t0 * NB + a0) * 32 + lane;
  cur.os = t0 * SW * 32 + lane;
#if TRIG == 1
  dep_launch();
#endif
  Blk A;
  if (t0 < T) load_main(A, cur);  // the first block in flight while the inputs are staged
  // the salient words of this warp's blocks, w_lo .. w_hi - 1 (lane l holds block a0 + l's
  // first)
  const int sfl = lane <= nu ? sfirst[a0 + lane] : 0;
  const int w_lo = __shfl_sync(0xffffffffu, sfl, 0);
  const int w_hi = nu < 32 ? __shfl_sync(0xffffffffu, sfl, min(nu, 31)) : sfirst[a1];
  auto load_sal = [&](Blk& k, const Cur& u, int f0, int f1) {
    k.f0 = f0;
    k.f1 = f1;
    const uint2* s = cbs + u.os + f0 * 32;  // whether the block has them or not: the words
    k.s0 = s[0];                             // past the last tile's are spare zeros
    k.s1 = s[32];                            // (codebook.SPARE_SAL_WORDS)
  };
  auto load = [&](Blk& k, const Cur& u) {
    load_main(k, u);
    load_sal(k, u, sf[u.a], sf[u.a + 1]);
  };
  // the column indices of the warp's first SPRE salient words are weights: requested before
  // dep_wait. A warp stages the inputs of its own blocks (the same columns in every tile it
  // visits): no block barrier before it decodes. (Its first block's salient words, requested
  // here too, made every token count slower: kernel_variants_tile_staging_2026-11-29.json.)
  int col[SPRE];
#pragma unroll
  for (int u = 0; u < SPRE; ++u) {
    const int j = 32 * (w_lo + u) + lane;
    col[u] = j < 32 * w_hi ? sc[j] : -1;
  }
  dep_wait();  // x and y belong to the kernels before this one
  STAMP(1);
  // main inputs: 8 columns (16 bytes) of a token an item (stage8: Haar domain or kept columns)
  const int per = nu * BS / 8, items = N * per;
#pragma unroll 4
  for (int it = lane; it < items; it += 32) {
    const int n = it / per, j0 = a0 * BS + (it - n * per) * 8;
    stage8(zm + n * ZC, *reinterpret_cast<const uint4*>(x + (size_t)n * C + j0), j0, keep + j0, c);
  }
  // salient inputs: one token's first SPRE words requested together; any other words (all of
  // them for several tokens) one at a time, all tokens together
  if (N == 1) {
    u16 h[SPRE];
#pragma unroll
    for (int u = 0; u < SPRE; ++u) h[u] = col[u] >= 0 ? x[col[u]] : (u16)0;
#pragma unroll
    for (int u = 0; u < SPRE; ++u)
      if (w_lo + u < w_hi) zs[32 * (w_lo + u) + lane] = h[u];
  }
  for (int j = 32 * (w_lo + (N == 1 ? SPRE : 0)) + lane; j < 32 * w_hi; j += 32) {
    const int u = (j - 32 * w_lo) >> 5;
    const int cj = u == 0 ? col[0] : u == 1 ? col[1] : sc[j];
    for (int n = 0; n < N; ++n) zs[n * ZSC + j] = cj >= 0 ? x[(size_t)n * C + cj] : (u16)0;
  }
  for (int i = lane; i <= nu; i += 32) sf[a0 + i] = i == lane ? sfl : sfirst[a0 + i];
  __syncwarp();
  if (t0 < T) load_sal(A, cur, sf[a0], sf[a0 + 1]);
  STAMP(2);
#if TRIG == 3
  if (t0 >= T) dep_launch();  // warps with no blocks
#endif
  const int zo = min(g, N - 1);  // this lane's token row of the B fragments
  const u16* zr = zm + zo * ZC + q * 8;
  const u16* zsr = zs + zo * ZSC + q * 8;
  float am[2][NTILE][4], as[2][NTILE][4];  // [MMA tile][n-tile][fragment], main and salient
  auto run = [&](const Blk& k, int os, int a) {  // os: the tile's salient words
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
    if (k.f0 < k.f1) {  // salient words: the preloaded two (blocks of up to 64 salient
      uint2 bk[4];       // columns), then any others
      books(k.bs, g, bk);
      const uint4 bz0 = *reinterpret_cast<const uint4*>(zsr + k.f0 * 32);
      word(as, k.s0.x, k.s0.y, &bz0, bk);
      if (k.f0 + 1 < k.f1) {
        const uint4 bz1 = *reinterpret_cast<const uint4*>(zsr + k.f0 * 32 + 32);
        word(as, k.s1.x, k.s1.y, &bz1, bk);
#pragma unroll 1
        for (int w = k.f0 + 2; w < k.f1; ++w) {
          const uint2 cw = cbs[os + w * 32];
          const uint4 bz = *reinterpret_cast<const uint4*>(zsr + w * 32);
          word(as, cw.x, cw.y, &bz, bk);
        }
      }
    }
  };
  Cur un = cur;  // the unit after A's
  next(un);
#pragma unroll 1
  for (int t = blockIdx.x, k = 0; t < T; t += gridDim.x, ++k) {
    const int os = t * SW * 32 + lane;
#pragma unroll
    for (int v = 0; v < 2; ++v)
#pragma unroll
      for (int i = 0; i < 4; ++i) am[v][0][i] = as[v][0][i] = 0.f;
#pragma unroll 2
    for (int a = a0; a < a1; ++a) {  // A holds block a of tile t
      Blk B;
      if (un.t < T) load(B, un);  // in flight while A is decoded
      run(A, os, a);
      A = B;
#if TRIG == 3
      if (t == (int)blockIdx.x && a == a0) dep_launch();
#endif
      if (k == 0 && a == a0) STAMP(3);
      next(un);
    }
    if (k == 0) STAMP(4);
    // fragments -> this warp's partial outputs: element i is row g + 8 (i >> 1) of the MMA tile,
    // token 2q + (i & 1); salient (and col-layout main) tiles are the low (A) and high (B) rows
    // of pairs g + 8 (i >> 1), output rows 2p, 2p + 1. Row layout: the main rows, then the
    // salient pairs added (one writer per (row, token) in each step).
    float* fk = fin + (k & 1) * nw * N * 32;
    float* fw = fk + wid * N * 32;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = 2 * q + (i & 1), p = g + 8 * (i >> 1);
      if (n < N) {
#if ROW
        fw[n * 32 + p] = am[0][0][i];
        fw[n * 32 + 16 + p] = am[1][0][i];
#else
        const float lo = am[0][0][i] + as[0][0][i], hi = am[1][0][i] + as[1][0][i];
        fw[n * 32 + 2 * p] = c * (lo + hi);
        fw[n * 32 + 2 * p + 1] = c * (lo - hi);
#endif
      }
    }
#if ROW
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = 2 * q + (i & 1), p = g + 8 * (i >> 1);
      if (n < N) {
        const float lo = as[0][0][i], hi = as[1][0][i];
        fw[n * 32 + 2 * p] += c * (lo + hi);
        fw[n * 32 + 2 * p + 1] += c * (lo - hi);
      }
    }
#endif
    // one barrier a tile: the partials alternate between two buffers, and every thread has
    // summed tile k - 2's before it passes tile k - 1's barrier
    __syncthreads();
    for (int i = threadIdx.x; i < 32 * N; i += blockDim.x) {  // (row, token): the warps' partials
      const int r = i & 31, n = i >> 5, row = 32 * t + r;
      float s = 0.f;
      for (int w = 0; w < nw; ++w) s += fk[(w * N + n) * 32 + r];
      if (row < R) y[(size_t)n * R + row] = st(s);
    }
    if (k == 0) STAMP(5);
  }
  STAMP(6);
#ifdef PROBE
  if ((threadIdx.x & 31) == 0) SLOT(8) = ns_now();
#endif
#if TRIG == 2
  dep_launch();
#endif
}
"""


def macros(row: bool, bs: int, trig: int = 1) -> dict:
    """Compile-time constants: layout, blocksize, where the next kernel may launch
    (:data:`CONFIG`'s ``pdl``)."""
    return dict(ROW=int(row), DT=0, BS=bs, TRIG=trig)


@functools.cache
def _kernel(row: bool, bs: int, device: int, trig: int = 1, probe: bool = False):
    name = f"hbllm_tile_{'row' if row else 'col'}_{bs}_t{trig}" + "_probe" * probe
    extra = {"PROBE": 1} if probe else {}
    return nvrtc.compile_kernel(SOURCE, name, device, **macros(row, bs, trig), **extra)


@functools.cache
def available() -> bool:
    """Whether the NVRTC kernel compiles here (CUDA, PyTorch >= 2.9, sm_80 or newer)."""
    return nvrtc.compiles(lambda: _kernel(True, 128, torch.cuda.current_device()), 8)


def config(rows: int, cols: int, tokens: int) -> dict:
    """Launch config of a (rows, cols) layer at ``tokens`` (1-8) tokens a launch: :data:`TUNED`
    at its bucket, else :data:`CONFIG`."""
    return TUNED.get((rows, cols, next(b for b in BUCKETS if tokens <= b)), CONFIG)


def smem_bytes(cols: int, sal_words: int, tokens: int, warps: int) -> int:
    """Shared memory of a launch: the staged inputs of ``tokens`` tokens, the warps' partial
    outputs of two row tiles and the salient words' first index a quantization block."""
    halves = (((cols // 32) | 1) + (sal_words | 1)) * 32
    return 2 * tokens * halves + 4 * 2 * warps * 32 * tokens + 4 * (cols // 32 + 1)


def tokens_a_launch(cols: int, sal_words: int, warps: int, device: int) -> int:
    """The most tokens (8, 4, 2 or 1) whose inputs fit the device's shared memory; 0: none."""
    return next((n for n in (8, 4, 2, 1)
                 if smem_bytes(cols, sal_words, n, warps) <= nvrtc.smem_limit(device)), 0)


def fits(cols: int, sal_words: int, device: torch.device) -> bool:
    """Whether one token's inputs fit shared memory (with the most warps a block)."""
    return tokens_a_launch(cols, sal_words, MAX_WARPS, nvrtc.device_index(device)) > 0


def gemv(x: torch.Tensor, rt: dict[str, torch.Tensor], meta: dict, c: float,
         scratch: dict, probe: torch.Tensor | None = None) -> torch.Tensor:
    """y (N, R) = x (N, C) W^T for fp16 x (N, C) contiguous on CUDA, up to 8 tokens a launch
    (fewer where their inputs do not fit shared memory). ``scratch``: a dict the caller keeps
    per layer (the codebook buffers). ``probe``: int64 (blocks x warps x 16) on the device, for
    the kernel built with its timestamps (``scripts/tile_timeline.py``)."""
    n, cols = x.shape
    cfg = config(meta["rows"], cols, min(n, MAX_TOKENS))
    warps = cfg["warps"]
    if not 1 <= warps <= MAX_WARPS:
        raise ValueError(f"tile GEMV config {cfg}: warps must be 1-{MAX_WARPS} (512 threads a "
                         "block)")
    device = nvrtc.device_index(x.device)
    sal_words = rt["sal_wgrp"].numel()
    nt = tokens_a_launch(cols, sal_words, warps, device)
    if nt == 0:
        raise ValueError(f"tile GEMV: the inputs of one token ({cols} columns, {sal_words} "
                         "salient words) do not fit shared memory; use the codebook GEMV")
    nt = min(nt, n)
    buf = cuda_codebook.buffers(rt, meta, scratch)
    pdl = cfg.get("pdl", 0)
    kernel = _kernel(meta["layout"] == "row", meta["blocksize"], device, max(pdl, 1),
                     probe is not None)
    smem = smem_bytes(cols, sal_words, nt, warps)
    tiles = (meta["rows"] + 31) // 32
    grid = (min(tiles, nvrtc.resident_blocks(kernel, 32 * warps, smem, device)), 1, 1)
    after_first = nvrtc.settled(scratch, ("tile", x.device))
    return nvrtc.launch(kernel, x, rt, meta, c, nt, grid, 32 * warps, smem,
                        extra=[rt["sal_first"], buf["cb_main"], buf["book_main"], buf["cb_sal"],
                               buf["book_sal"]] + ([] if probe is None else [probe]),
                        pdl=pdl > 0 and after_first)

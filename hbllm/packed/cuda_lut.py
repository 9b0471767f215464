"""Decode-time (1-4 tokens) packed linear with lookup tables, compiled at first use with NVRTC.

Per statistics group of a band row, with 0/1 sign and group bits ``s, g`` and the row's
``[m0, a0, m1, a1]``, the coefficient is ``w = m_g + a_g (2s - 1)``, so

    sum_t w_t z_t = (m0 - a0) Z + (m1 - m0 + a0 - a1) Z_g + 2 a0 Z_s + 2 (a1 - a0) Z_sg

with ``Z`` the sum of the group's inputs and ``Z_g, Z_s, Z_sg`` the sums where ``g``, ``s``,
``s & g`` are set. A block first writes, for every 4 consecutive inputs of its column chunk, the
16 sums of their subsets (fp32, shared memory); a masked sum over 4 coefficients is then one
table read, so a coefficient costs about 3/4 of an instruction per mask instead of bit tests,
selects and an FMA. The 32 lanes of a warp are 32 band rows reading the same table, whose 16
entries lie in 16 distinct banks: the reads never conflict.

Grid: (tiles of ``warps x 16`` row pairs, column chunks of ``cb`` quantization blocks). A warp
owns 16 row pairs (32 output rows) of one chunk; lanes are band rows -- the output rows
``2p0 + lane`` for the row layout's main band, the pairs' low (lanes 0-15) and high (16-31) rows
otherwise -- and shuffles combine them into output rows. A warp walks its chunk one quantization
block at a time (main words, statistics, the block's salient words), the next block's loads in
flight while it works on the current one; a salient word reads only its live nibbles (its padded
slots, at its end, are counted once per launch). With several chunks, blocks add their
partial outputs into a float32 workspace; the last block of a tile (a counter per tile) writes
the fp16/bf16 output and zeroes the workspace and counter for the next call, so one launch does
it all (calls on one layer must not overlap in time: they share the workspace). The float32
partial sums arrive in any order, so two calls may differ in the last bit of the output.

Buffers are those of :func:`hbllm.packed.runtime.build_runtime` plus, per layer and device, the
workspace and the counters (``scratch``, zeroed at the first call: no host synchronization, so the
first call may also happen inside CUDA-graph capture). ``scratch["block_sal_words"]``, the most
salient words of a block (set by ``PackedLinear``), sizes the salient tables (default:
blocksize / 32).
"""
from __future__ import annotations

import functools

import torch

from . import nvrtc

MAX_TOKENS = 4
# Launch config: warps (row tiles of 16 pairs) per block, quantization blocks per column chunk,
# programmatic dependent launch (``pdl``, nvrtc.PDL): 0 none, 1 the next kernel may launch from the
# start of this one, 2 after its block loop, 3 after its first block (absent: 0).
# CONFIG: the fallback, the config closest to each shape's best (mean time / best) in
# ``scripts/bench_kernel.py --tune lut`` over the 7B shapes at 1 token; TUNED: per (rows, cols,
# tokens a launch), as ``--tune`` prints it. H200, 2026-11-29: 1 token
# experiments/benchmarks/raw/kernel_pdl_trig_2026-11-29.json; 4 tokens (never chosen: the codebook
# GEMV is twice as fast there) kernel_loop_2026-11-29.json.
CONFIG = {"warps": 8, "cb": 3, "pdl": 1}
TUNED: dict[tuple, dict] = {
    (4096, 4096, 1): {"warps": 4, "cb": 2, "pdl": 2}, (4096, 4096, 4): {"warps": 8, "cb": 2},
    (11008, 4096, 1): {"warps": 16, "cb": 3, "pdl": 3}, (11008, 4096, 4): {"warps": 4, "cb": 1},
    (4096, 11008, 1): {"warps": 16, "cb": 3, "pdl": 1}, (4096, 11008, 4): {"warps": 8, "cb": 1},
}

SOURCE = r"""
#define WPB (BS / 32)                 // words per quantization block
#define WC (CB * WPB)                 // main words per column chunk
#define GW (ROW ? BS / 64 : BS / 32)  // main words per statistics group
#define GPB (WPB / GW)                // main statistics groups per block (row 2, col 1)
#define POS (WC * 8)                  // main table positions (4 inputs each) per token
#if MV == 4                           // main words per lane load (runtime.word_vec)
typedef uint4 wvec;
__device__ __forceinline__ void unvec(uint4 a, unsigned* o) { o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; }
#else
typedef uint2 wvec;
__device__ __forceinline__ void unvec(uint2 a, unsigned* o) { o[0] = a.x; o[1] = a.y; }
#endif
// what a lane reads for one quantization block: main words and group statistics, salient
// statistics, the block's salient words [f0, f1) and the first of them (most blocks have one)
struct Blk { unsigned s[WPB], g[WPB]; uint2 tg[GPB]; uint2 ts; unsigned s1, g1; int f0, f1; };
// acc += the group's masked sums weighted by the row's statistics t = [m0, a0, m1, a1] (fp16)
__device__ __forceinline__ void fold(float* acc, uint2 t, float* z, float* zg, float* zs, float* zx) {
  const float4 v = stats4(t);
  const float m0 = v.x, a0 = v.y, m1 = v.z, a1 = v.w;
  const float k0 = m0 - a0, k1 = m1 - m0 + a0 - a1, k2 = 2.f * a0, k3 = 2.f * (a1 - a0);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    acc[n] += k0 * z[n] + k1 * zg[n] + k2 * zs[n] + k3 * zx[n];
    z[n] = zg[n] = zs[n] = zx[n] = 0.f;
  }
}
// byte offset of nibble k of word v in a 16-float table
__device__ __forceinline__ unsigned nib(unsigned v, int k) {
  return (k == 0 ? v << 2 : v >> (4 * k - 2)) & 0x3cu;
}
// masked sums of one word (s, g) against tables tb (word's 8 positions x 16, per token tstride);
// the s & g index is the AND of the two extracted ones; only the first nk nibbles are read (a
// salient word's padded slots, x = 0, are at its end)
__device__ __forceinline__ void word(unsigned s, unsigned g, const float* tb, const float* tw,
    int tstride, int wstride, float* z, float* zg, float* zs, float* zx, int nk = 8) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (k >= nk) break;
    const unsigned is = nib(s, k), ig = nib(g, k), ix = is & ig;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const char* t = reinterpret_cast<const char*>(tb + n * tstride + 16 * k);
      zs[n] += *reinterpret_cast<const float*>(t + is);
      zg[n] += *reinterpret_cast<const float*>(t + ig);
      zx[n] += *reinterpret_cast<const float*>(t + ix);
    }
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) z[n] += tw[n * wstride];
}
// tables of 4-input subset sums: position p of token n holds v0..v3 -> 16 sums, word totals by
// an 8-lane shuffle (a word is 8 consecutive positions); v(n, j) gives input j of the range
// (npos positions are filled, a multiple of 8; the token stride is npos_all)
template <typename F>
__device__ __forceinline__ void tables(float* tb, float* tw, int N, int npos, int npos_all, F v) {
  for (int base = 0; base < NT * npos; base += blockDim.x) {
    const int t = base + threadIdx.x, n = t / max(npos, 1), p = t - n * npos;
    float z0 = 0.f, z1 = 0.f, z2 = 0.f, z3 = 0.f;
    if (n < N) { z0 = v(n, 4 * p); z1 = v(n, 4 * p + 1); z2 = v(n, 4 * p + 2); z3 = v(n, 4 * p + 3); }
    if (n < NT) {
      const float a1 = z0 + z1, a2 = z0 + z2, a3 = z1 + z2, a4 = a1 + z2;
      float4* o = reinterpret_cast<float4*>(tb + ((size_t)n * npos_all + p) * 16);
      o[0] = make_float4(0.f, z0, z1, a1);
      o[1] = make_float4(z2, a2, a3, a4);
      o[2] = make_float4(z3, z0 + z3, z1 + z3, a1 + z3);
      o[3] = make_float4(z2 + z3, a2 + z3, a3 + z3, a4 + z3);
    }
    float sum = z0 + z1 + z2 + z3;
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    sum += __shfl_xor_sync(0xffffffffu, sum, 4);
    if (n < NT && (p & 7) == 0) tw[n * (npos_all >> 3) + (p >> 3)] = sum;
  }
}
extern "C" __global__ void __launch_bounds__(512) NAME(PACKED_ARGS,
    const int* __restrict__ sfirst, float* __restrict__ ws, unsigned* __restrict__ cnt, int SMAX) {
  extern __shared__ float4 smem4[];
  float* tm = reinterpret_cast<float*>(smem4);  // [NT][POS][16] main tables
  float* tsl = tm + NT * POS * 16;              // [NT][SMAX * 8][16] salient tables
  float* tmw = tsl + NT * SMAX * 128;           // [NT][WC] main word totals
  float* tsw = tmw + NT * WC;                   // [NT][SMAX] salient word totals
  int* tsn = reinterpret_cast<int*>(tsw + NT * SMAX);  // [SMAX] live nibbles of a salient word
  const float c = (float)cd;
  const int lane = threadIdx.x & 31, W = C >> 5;
  const int tw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // row tile of the warp
  const int p0 = tw * 16;                                               // its first pair
  const int t = min(tw, (R + 31) / 32 - 1);  // warps past the last tile load it, store nothing
  const int cb0 = blockIdx.y * CB, ncb = min(CB, NB - cb0);
  const int nw = ncb * WPB;  // main words of the chunk
  // block a's words and statistics for this lane (tiled layout: a warp's load is consecutive
  // memory; tiles past the band hold zeros)
  auto load = [&](Blk& k, int a) {
#pragma unroll
    for (int i = 0; i < WPB; i += MV) {
      const size_t at = ((size_t)t * (W / MV) + (a * WPB + i) / MV) * 32 + lane;
      unvec(reinterpret_cast<const wvec*>(ms)[at], k.s + i);
      unvec(reinterpret_cast<const wvec*>(mm)[at], k.g + i);
    }
#if ROW && MSV == 2  // the block's two groups, one 16-byte load
    const uint4 v = reinterpret_cast<const uint4*>(mst)[((size_t)t * (G / 2) + a) * 32 + lane];
    k.tg[0] = make_uint2(v.x, v.y);
    k.tg[1] = make_uint2(v.z, v.w);
#else
#pragma unroll
    for (int j = 0; j < GPB; ++j) k.tg[j] = mst[tidx(t, a * GPB + j, lane, G, MSV)];
#endif
    k.ts = sst[tidx(t, a, lane, NB, SSV)];
    k.f0 = sfirst[a];
    k.f1 = sfirst[a + 1];
    k.s1 = k.f0 < k.f1 ? ss[((size_t)t * SW + k.f0) * 32 + lane] : 0u;
    k.g1 = k.f0 < k.f1 ? sm[((size_t)t * SW + k.f0) * 32 + lane] : 0u;
  };
  Blk cur, nxt;
#if TRIG == 1
  dep_launch();
#endif
  load(cur, cb0);  // in flight while the tables are built
  dep_wait();      // x and the outputs belong to the kernels before this one
  const int sw0 = sfirst[cb0], nsw = sfirst[cb0 + ncb] - sw0;
  // tables: main inputs of the chunk (row layout: the Haar domain), x at its salient slots
  tables(tm, tmw, N, nw * 8, POS, [&](int n, int j) -> float {
    const u16* xn = x + (size_t)n * C;
#if ROW
    const int b = j / BS, k = j - b * BS, h = k >= BS / 2, kk = k - h * (BS / 2);
    const unsigned two = reinterpret_cast<const unsigned*>(xn)[((cb0 + b) * BS >> 1) + kk];
    const float e = ld((u16)(two & 0xffff)), o = ld((u16)(two >> 16));
    return c * (h ? e - o : e + o);
#else
    const int col = cb0 * BS + j;
    return keep[col] ? ld(xn[col]) : 0.f;
#endif
  });
  tables(tsl, tsw, N, nsw * 8, SMAX * 8, [&](int n, int j) -> float {
    const int col = sc[sw0 * 32 + j];
    return col >= 0 ? ld(x[(size_t)n * C + col]) : 0.f;
  });
  for (int q = threadIdx.x; q < nsw; q += blockDim.x) {
    int k = 0;
#pragma unroll
    for (int p = 0; p < 8; ++p) k += sc[(sw0 + q) * 32 + 4 * p] >= 0;
    tsn[q] = k;
  }
  __syncthreads();
  float am[NT], as[NT], z[NT], zg[NT], zs[NT], zx[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) am[n] = as[n] = z[n] = zg[n] = zs[n] = zx[n] = 0.f;
  // one block at a time, the next one's loads in flight
#pragma unroll 1
  for (int b = 0; b < ncb; ++b) {
    load(nxt, cb0 + min(b + 1, ncb - 1));  // (no branch: the loads issue before the work)
#pragma unroll
    for (int i = 0; i < WPB; ++i) {
      word(cur.s[i], cur.g[i], tm + (b * WPB + i) * 128, tmw + b * WPB + i, POS * 16, WC, z, zg, zs, zx);
      if ((i + 1) % GW == 0) fold(am, cur.tg[i / GW], z, zg, zs, zx);
    }
    for (int w = cur.f0; w < cur.f1; ++w) {
      const unsigned sw = w == cur.f0 ? cur.s1 : ss[((size_t)t * SW + w) * 32 + lane];
      const unsigned gw = w == cur.f0 ? cur.g1 : sm[((size_t)t * SW + w) * 32 + lane];
      word(sw, gw, tsl + (w - sw0) * 128, tsw + (w - sw0), SMAX * 128, SMAX, z, zg, zs, zx, tsn[w - sw0]);
    }
    fold(as, cur.ts, z, zg, zs, zx);
    cur = nxt;
#if TRIG == 3
    if (b == 0) dep_launch();
#endif
  }
#if TRIG == 2
  dep_launch();
#endif
  // lanes -> output rows 2 p0 + lane: (lo + hi, lo - hi) of pair lane / 2 (+ main row)
  float out[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#if ROW
    const float u = as[n];
#else
    const float u = am[n] + as[n];
#endif
    const float lo = __shfl_sync(0xffffffffu, u, lane >> 1), hi = __shfl_sync(0xffffffffu, u, 16 + (lane >> 1));
    out[n] = c * ((lane & 1) ? lo - hi : lo + hi);
#if ROW
    out[n] += am[n];
#endif
  }
  const int row = 2 * p0 + lane;
  if (gridDim.y == 1) {
    if (row < R)
#pragma unroll
      for (int n = 0; n < NT; ++n) if (n < N) y[(size_t)n * R + row] = st(out[n]);
    return;
  }
  if (row < R)
#pragma unroll
    for (int n = 0; n < NT; ++n) if (n < N) atomicAdd(ws + (size_t)n * R + row, out[n]);
  __threadfence();
  __syncthreads();
  bool last = false;  // (no static shared memory: the launch opts in to all of it dynamically)
  if (threadIdx.x == 0) last = atomicAdd(cnt + blockIdx.x, 1u) == gridDim.y - 1;
  if (!__syncthreads_or(last)) return;
  __threadfence();
  float v[NT];  // all tokens' sums read before any output is written (reads in flight together)
#pragma unroll
  for (int n = 0; n < NT; ++n) if (row < R && n < N) v[n] = atomicExch(ws + (size_t)n * R + row, 0.f);
#pragma unroll
  for (int n = 0; n < NT; ++n) if (row < R && n < N) y[(size_t)n * R + row] = st(v[n]);
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0u;
}
"""


@functools.cache
def _kernel(row: bool, nt: int, bf16: bool, bs: int, cb: int, mv: int, msv: int, ssv: int,
            device: int, trig: int = 1):
    name = (f"hbllm_lut_{'row' if row else 'col'}_{nt}_{'bf16' if bf16 else 'fp16'}_{bs}_{cb}_"
            f"{mv}{msv}{ssv}_t{trig}")
    return nvrtc.compile_kernel(SOURCE, name, device,
                                **macros(row, nt, bf16, bs, cb, mv, msv, ssv, trig))


def macros(row: bool, nt: int, bf16: bool, bs: int, cb: int, mv: int, msv: int, ssv: int,
           trig: int = 1) -> dict:
    """The compile-time constants of one kernel variant (see :func:`variant`); ``trig``: where the
    next kernel may launch (:data:`CONFIG`'s ``pdl``: 1 at the start, 2 after the block loop, 3
    after the first block)."""
    return dict(ROW=int(row), NT=nt, DT=int(bf16), BS=bs, CB=cb, MV=mv, MSV=msv, SSV=ssv,
                TRIG=trig)


def variant(rt: dict[str, torch.Tensor], meta: dict, nt: int, bf16: bool, cb: int) -> tuple:
    """Kernel variant for a layer's buffers: (row, nt, bf16, bs, cb, words per lane load, main and
    salient statistics groups per lane load)."""
    row, bs = meta["layout"] == "row", meta["blocksize"]
    mv, msv, ssv = rt["main_sign"].shape[-1], rt["main_stats"].shape[-2], rt["sal_stats"].shape[-2]
    return row, nt, bf16, bs, cb, mv, msv, ssv


@functools.cache
def available() -> bool:
    """Whether the NVRTC kernel compiles here (CUDA, PyTorch >= 2.9)."""
    return nvrtc.compiles(lambda: _kernel(True, 1, False, 128, CONFIG["cb"], 4, 2, 2,
                                          torch.cuda.current_device()))


def config(rows: int, cols: int, nt: int) -> dict:
    """Launch config for a (rows, cols) layer at ``nt`` tokens a launch: the measured one of
    :data:`TUNED`, else :data:`CONFIG`."""
    return TUNED.get((rows, cols, nt), CONFIG)


def _scratch(meta: dict, device: torch.device, tiles: int, scratch: dict) -> dict:
    """Per layer and device: a zeroed float32 workspace (MAX_TOKENS x rows) and tile counters."""
    key = (str(device), tiles)
    if key not in scratch:
        scratch[key] = {"ws": torch.zeros(MAX_TOKENS * meta["rows"], device=device),
                        "cnt": torch.zeros(tiles, device=device, dtype=torch.int32)}
    return scratch[key]


def gemv(x: torch.Tensor, rt: dict[str, torch.Tensor], meta: dict, c: float,
         scratch: dict) -> torch.Tensor:
    """y (N, R) = x (N, C) W^T for few tokens, fp16 or bf16, x contiguous on CUDA. ``scratch``:
    a dict the caller keeps per layer (workspace and counters, zeroed at the first call)."""
    n, cols = x.shape
    nt = 1 << (min(n, MAX_TOKENS).bit_length() - 1)  # 1, 2 or 4 tokens per launch
    cfg = config(meta["rows"], cols, nt)
    warps, cb = cfg["warps"], cfg["cb"]
    bs = meta["blocksize"]
    tiles = (meta["rows"] // 2 + 16 * warps - 1) // (16 * warps)  # blocks of `warps` row tiles
    sc = _scratch(meta, x.device, tiles, scratch)
    nb = cols // bs
    pdl = cfg.get("pdl", 0)
    kernel = _kernel(*variant(rt, meta, nt, x.dtype == torch.bfloat16, cb),
                     nvrtc.device_index(x.device), max(pdl, 1))
    words = cb * bs // 32
    smax = min(words, cb * scratch.get("block_sal_words", bs // 32))  # salient words of a chunk, at most
    smem = 4 * nt * (words + smax) * (8 * 16 + 1) + 4 * smax  # tables, word totals, live nibbles
    grid = (tiles, (nb + cb - 1) // cb, 1)
    after_first = nvrtc.settled(scratch, ("lut", x.device))
    return nvrtc.launch(kernel, x, rt, meta, c, nt, grid, 32 * warps, smem,
                        extra=[rt["sal_first"], sc["ws"], sc["cnt"], smax],
                        pdl=pdl > 0 and after_first)

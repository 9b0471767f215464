"""Packed linear on tensor cores with per-row codebooks (1-16 fp16 tokens a launch), compiled at
first use with NVRTC.

Each coefficient is decoded straight to its fp16 value: the buffers of
:mod:`hbllm.packed.codebook` hold, per lane and 32-column word, the 2-bit codes of the lane's
A-fragment registers, and a register is a byte permute (``prmt``) of the row's 8-byte codebook
whose selector is a mask and a multiply-high-add of the stored word (:func:`codebook.selector`):
three instructions for two coefficients (plus one shift a word). One ``mma.m16n8k16`` then
multiplies 16 rows x 16 columns by up to 8 tokens, so the decode is shared by all tokens of a
launch (two n-tiles for 9-16).

Grid: (groups of ``warps`` row tiles, column chunks of ``cb`` quantization blocks), as the
lookup-table GEMV: a block stages its chunk's inputs in shared memory in plain column order (row
layout: the Haar domain; lane q's B fragments of a word are its columns 8q .. 8q + 7) and the
chunk's salient inputs; a warp owns one row tile (two MMA tiles of 16 slots) and walks the chunk
one quantization block at a time, each lane cp.async-ing its own pieces of the next ``st - 1``
blocks (codes, codebooks, the first two salient words) into a ring in shared memory. A lane
loads its own slot's codebooks and takes the four rows it needs by shuffles. A warp assembles its
32 output rows in shared memory with plain stores; partial outputs of several chunks meet in a
float32 workspace and the last block of a tile writes the output (same scheme and caveats as
:mod:`cuda_lut`).
"""
from __future__ import annotations

import functools

import torch

from . import codebook, nvrtc

MAX_TOKENS = 16
# Launch config: warps (row tiles) per block, quantization blocks per column chunk, stages of a
# warp's cp.async ring, programmatic dependent launch (``pdl``, nvrtc.PDL: 0 none, 1 the next
# kernel may launch from the start of this one, 2 after its block loop, 3 after its first block;
# absent: 0). TUNED per (rows, cols, token bucket: 1, 4, 8 or 16, the smallest that holds the
# call's tokens), as ``bench_kernel.py --tune cb`` prints it; CONFIG, the fallback, is the config
# closest to each entry's best (mean time / best). H200, 2026-11-29:
# experiments/benchmarks/raw/kernel_tile_2026-11-29.json (CONFIG: kernel_pdl_trig_2026-11-29.json).
CONFIG = {"warps": 8, "cb": 4, "st": 2, "pdl": 3}
BUCKETS = (1, 4, 8, 16)
TUNED: dict[tuple, dict] = {
    (4096, 4096, 1): {"warps": 8, "cb": 4, "st": 2, "pdl": 3},
    (4096, 4096, 4): {"warps": 8, "cb": 4, "st": 2, "pdl": 3},
    (4096, 4096, 8): {"warps": 8, "cb": 4, "st": 2, "pdl": 3},
    (4096, 4096, 16): {"warps": 8, "cb": 4, "st": 2, "pdl": 3},
    (11008, 4096, 1): {"warps": 8, "cb": 4, "st": 2, "pdl": 1},
    (11008, 4096, 4): {"warps": 8, "cb": 4, "st": 2, "pdl": 1},
    (11008, 4096, 8): {"warps": 8, "cb": 4, "st": 2, "pdl": 3},
    (11008, 4096, 16): {"warps": 8, "cb": 6, "st": 2, "pdl": 3},
    (4096, 11008, 1): {"warps": 8, "cb": 4, "st": 2, "pdl": 1},
    (4096, 11008, 4): {"warps": 8, "cb": 4, "st": 2, "pdl": 3},
    (4096, 11008, 8): {"warps": 8, "cb": 4, "st": 2, "pdl": 1},
    (4096, 11008, 16): {"warps": 8, "cb": 6, "st": 2, "pdl": 3},
}

# What :mod:`cuda_tile` shares: MMA, selector, byte permute, a lane's four codebooks, one 32-column
# word into NTILE n-tiles of accumulators (NTILE defined by the includer), and the input staging.
DECODE = r"""
__device__ __forceinline__ void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Selectors. Register P's codes c (even column), c' (odd) sit at bits P, P + 1 and P + 8, P + 9
// of the stored word w; its selector has nibbles c + 4, c, c' + 4, c' (low and high bytes of
// codebook values c, c': the codebook holds the values' high bytes, then their low bytes), i.e.
// m * 0x11 + 0x0404 for m = (w >> P) & 0x0303. Registers P and P + 16 share one mask of their
// four codes: m0 = w & 0x03030303 (P = 0, in place) and mP = (w << (6 - P)) & 0xc0c0c0c0
// (P = 2, 4, 6: codes at bits 6, 14, 22, 30). A selector is then one multiply(-high)-add of
// the mask: m0 * 0x11 + 0x0404, and the high word of mP * (0x11 << 26), m0 * (0x11 << 16) or
// mP * (0x11 << 10) plus 0x0404. The bits above 15 hold other codes: the permute reads only
// the low 16 (codebook.selector emulates this).
// the high word of a * b + (c << 32): one IMAD.HI whose 64-bit addend is a register pair the
// compiler keeps for every call (written as PTX mad.hi, the pair was rebuilt by one or two moves
// before each use: 673 -> 469 SASS instructions a block loop, 1-8 tokens, cb 4)
__device__ __forceinline__ unsigned madhi(unsigned a, unsigned b, unsigned c) {
  return (unsigned)(((unsigned long long)a * b + ((unsigned long long)c << 32)) >> 32);
}
// bytes of (hi:lo) picked by the selector's low four nibbles (all below 8: no sign replication)
__device__ __forceinline__ unsigned perm(uint2 b, unsigned s) {
  unsigned r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(b.x), "r"(b.y), "r"(s));
  return r;
}
// codebooks of the four rows of this lane (slots g, g + 8, g + 16, g + 24) from the lanes that
// loaded them (lane l holds slot l's)
__device__ __forceinline__ void books(uint2 own, int g, uint2* bk) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    bk[k].x = __shfl_sync(0xffffffffu, own.x, g + 8 * k);
    bk[k].y = __shfl_sync(0xffffffffu, own.y, g + 8 * k);
  }
}
// one 32-column word: codes wa (tile A), wb (tile B); B fragments of the n-tiles bz; books bk
__device__ __forceinline__ void word(float (*acc)[NTILE][4], unsigned wa, unsigned wb,
                                     const uint4* bz, const uint2* bk) {
#pragma unroll
  for (int v = 0; v < 2; ++v) {
    const unsigned w = v ? wb : wa;
    const uint2 b0 = bk[2 * v], b1 = bk[2 * v + 1];  // rows g, g + 8 of the tile
    const unsigned m0 = w & 0x03030303u, m2 = (w << 4) & 0xc0c0c0c0u,
                   m4 = (w << 2) & 0xc0c0c0c0u, m6 = w & 0xc0c0c0c0u;
    unsigned a[2][4], k10;  // 0x11 << 10 as an opaque register: as a constant, the compiler
    asm("mov.b32 %0, 0x4400;" : "=r"(k10));  // derived those products from the << 26 ones with
                                             // an IMAD.WIDE and an IADD more a pair
    a[0][0] = perm(b0, m0 * 0x11u + 0x0404u);
    a[0][1] = perm(b1, madhi(m2, 0x44000000u, 0x0404u));
    a[0][2] = perm(b0, madhi(m4, 0x44000000u, 0x0404u));
    a[0][3] = perm(b1, madhi(m6, 0x44000000u, 0x0404u));
    a[1][0] = perm(b0, madhi(m0, 0x110000u, 0x0404u));
    a[1][1] = perm(b1, madhi(m2, k10, 0x0404u));
    a[1][2] = perm(b0, madhi(m4, k10, 0x0404u));
    a[1][3] = perm(b1, madhi(m6, k10, 0x0404u));
#pragma unroll
    for (int h = 0; h < NTILE; ++h) {
      mma(acc[v][h], a[0], bz[h].x, bz[h].y);
      mma(acc[v][h], a[1], bz[h].z, bz[h].w);
    }
  }
}
// 8 input columns j0 .. j0 + 7 of one token (v, 16 bytes) -> zn, that token's staged row, in
// plain column order. Row layout: the column pairs of block b = j0 / BS become the Haar lows
// c (x_even + x_odd) at b BS + (j0 % BS) / 2 .. + 3 and the highs c (x_even - x_odd) BS / 2
// later. Col layout: the columns kp (one byte each) marks kept, zeros at the salient ones.
__device__ __forceinline__ void stage8(u16* zn, uint4 v, int j0, const unsigned char* kp, float c) {
  const unsigned two[4] = {v.x, v.y, v.z, v.w};
#if ROW
  unsigned lh[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float e = ld((u16)(two[k] & 0xffff)), o = ld((u16)(two[k] >> 16));
    lh[k] = (unsigned)st(c * (e + o)) | ((unsigned)st(c * (e - o)) << 16);
  }
  const int b = j0 / BS, lo = b * BS + (j0 - b * BS) / 2;
  *reinterpret_cast<uint2*>(zn + lo) =
      make_uint2(__byte_perm(lh[0], lh[1], 0x5410), __byte_perm(lh[2], lh[3], 0x5410));
  *reinterpret_cast<uint2*>(zn + lo + BS / 2) =
      make_uint2(__byte_perm(lh[0], lh[1], 0x7632), __byte_perm(lh[2], lh[3], 0x7632));
#else
  const uint2 kb = *reinterpret_cast<const uint2*>(kp);  // bytes 0 / 1: kept or not
  unsigned m[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // columns 2k, 2k + 1: 0xffff where kept
    const unsigned bytes = (k < 2 ? kb.x : kb.y) >> (16 * (k & 1));
    m[k] = ((bytes & 1u) * 0xffffu) | ((bytes & 0x100u) * 0xffff00u);
  }
  *reinterpret_cast<uint4*>(zn + j0) =
      make_uint4(two[0] & m[0], two[1] & m[1], two[2] & m[2], two[3] & m[3]);
#endif
}
"""

SOURCE = r"""
#define WPB (BS / 32)           // words per quantization block
#define GPB (ROW ? 2 : 1)       // main codebooks (statistics groups) per block
#define WPGR (WPB / GPB)         // main words per group
#define NTILE (NT > 8 ? 2 : 1)  // n-tiles of 8 tokens
#define NT8 (8 * NTILE)
#define ZW (((CB * WPB) | 1) * 32)  // halves per token row of the chunk's main inputs (odd count of
                                    // 64-byte words: two token rows never share a bank)
""" + DECODE + r"""
// 9-16 tokens on sm_90: the workspace is (R, 16), a row's tokens contiguous, reduced 4 at a time
// (one vector reduction) and read and cleared 16 bytes at a time by the last block; else (N, R),
// one reduction a float (faster for 1-8 tokens: a warp's reductions of a token are consecutive)
#define VEC (NT > 8 && __CUDA_ARCH__ >= 900)
#if VEC
__device__ __forceinline__ void red4(float* p, float4 v) {  // p[0..3] += v
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
               :: "l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}
#endif
// cp.async of 16 bytes (L2 only) or of 8 bytes (zeros where !on: nothing is read) global -> shared
__device__ __forceinline__ void cp16(void* s, const void* g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
               :: "r"((unsigned)__cvta_generic_to_shared(s)), "l"(g) : "memory");
}
__device__ __forceinline__ void cp8(void* s, const void* g, bool on) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;"
               :: "r"((unsigned)__cvta_generic_to_shared(s)), "l"(g), "r"(on ? 8 : 0) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int K> __device__ __forceinline__ void wait_groups() {
  asm volatile("cp.async.wait_group %0;" :: "n"(K) : "memory");
}
#define NCP (WPB / 2)  // 16-byte pieces of a lane's main codes per quantization block
#define PPS (NCP + 3)  // pieces a lane stages per block: codes, main codebooks, salient codebook and
                       // first salient word, second salient word
extern "C" __global__ void __launch_bounds__(256) NAME(PACKED_ARGS,
    const int* __restrict__ sfirst, const uint4* __restrict__ cbm, const uint2* __restrict__ bkm,
    const uint2* __restrict__ cbs, const uint2* __restrict__ bks, float* __restrict__ ws,
    unsigned* __restrict__ cnt, int SMAX) {
  extern __shared__ float4 smem4[];
  const int ZSW = (SMAX | 1) * 32;                    // halves per token row of the salient inputs
  uint4* ring = reinterpret_cast<uint4*>(smem4);      // [warps][ST][PPS][32] staged blocks
  u16* zm = reinterpret_cast<u16*>(ring + (blockDim.x >> 5) * ST * PPS * 32);  // [NT][ZW] main inputs
  u16* zs = zm + NT * ZW;                             // [NT][ZSW] salient inputs of the chunk
  float* fin = reinterpret_cast<float*>(zs + NT * ZSW);  // [warps][32 rows][NT8] outputs
  int* sf = reinterpret_cast<int*>(fin + (blockDim.x >> 5) * 32 * NT8);  // [CB + 1] salient words
  const float c = (float)cd;
  const int T = (R + 31) / 32, W = C >> 5;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int tw = blockIdx.x * (blockDim.x >> 5) + wid;  // row tile of the warp
  const int t = min(tw, T - 1);  // warps past the last tile compute it again, store nothing
  const int cb0 = blockIdx.y * CB, ncb = min(CB, NB - cb0);
  const int sw0 = sfirst[cb0], nsw = sfirst[cb0 + ncb] - sw0;
  // a lane stages its own pieces of a block and reads only those back: cp.async.wait_group is
  // all the ordering it needs. Stage s of this lane: piece p at rw[(s * PPS + p) * 32].
  uint4* rw = ring + wid * ST * PPS * 32 + lane;
  auto stage_main = [&](int s, int a) {  // codes, main and salient codebooks of block a
    uint4* d = rw + s * PPS * 32;
#pragma unroll
    for (int i = 0; i < NCP; ++i) cp16(d + i * 32, cbm + ((size_t)t * (W / 2) + a * NCP + i) * 32 + lane);
#if GPB == 2
    cp16(d + NCP * 32, bkm + (((size_t)t * NB + a) * 32 + lane) * 2);
#else
    cp8(d + NCP * 32, bkm + ((size_t)t * NB + a) * 32 + lane, true);
#endif
    cp8(d + (NCP + 1) * 32, bks + ((size_t)t * NB + a) * 32 + lane, true);
  };
  auto stage_sal = [&](int s, int a) {  // the block's first two salient words, zeros past its last
    uint4* d = rw + s * PPS * 32;
    const int f0 = sf[a - cb0], f1 = sf[a - cb0 + 1];
    const uint2* w0 = cbs + ((size_t)t * SW + min(f0, max(SW - 1, 0))) * 32 + lane;
    const uint2* w1 = cbs + ((size_t)t * SW + min(f0 + 1, max(SW - 1, 0))) * 32 + lane;
    cp8(reinterpret_cast<uint2*>(d + (NCP + 1) * 32) + 1, w0, f0 < f1);
    cp8(d + (NCP + 2) * 32, w1, f0 + 1 < f1);
  };
  // blocks 0 .. ST-2 in flight while the inputs are staged (their salient words need sf: after)
#if TRIG == 1
  dep_launch();
#endif
#pragma unroll
  for (int s = 0; s < ST - 1; ++s)
    if (s < ncb) stage_main(s, cb0 + s);
  commit();
  dep_wait();  // x and the outputs belong to the kernels before this one
  // inputs -> shared memory in column order (lane q's B fragments of a word are its columns
  // 8q .. 8q + 7, one 16-byte read), with every global load of a round in flight at once. Main
  // inputs (fp16; row layout: c (x_even +- x_odd)): an item is 8 columns (16 bytes) of a token,
  // PER items a token (those past a partial last chunk skipped), SU items a thread a round.
  // Salient inputs: a thread takes slot j of the chunk's salient words for all tokens (its column
  // index loaded once, during the first main round).
  constexpr int PER = CB * BS / 8;
  const int items = N * PER, live = ncb * BS;
  auto fetch = [&](int base, uint4* v) {
#pragma unroll
    for (int u = 0; u < SU; ++u) {
      const int it = base + u * blockDim.x, n = it / PER, j0 = (it % PER) * 8;
      if (it < items && j0 < live) v[u] = *reinterpret_cast<const uint4*>(x + (size_t)n * C + cb0 * BS + j0);
    }
  };
  auto put = [&](int base, const uint4* v) {
#pragma unroll
    for (int u = 0; u < SU; ++u) {
      const int it = base + u * blockDim.x, n = it / PER, j0 = (it % PER) * 8;
      if (it < items && j0 < live) stage8(zm + n * ZW, v[u], j0, keep + cb0 * BS + j0, c);
    }
  };
  {
    uint4 v[SU];
    fetch(threadIdx.x, v);
    const int slots = nsw * 32;
    int col = threadIdx.x < slots ? sc[sw0 * 32 + threadIdx.x] : -1;
    put(threadIdx.x, v);
    for (int base = threadIdx.x + SU * blockDim.x; base < items; base += SU * blockDim.x) {
      fetch(base, v);
      put(base, v);
    }
    for (int j = threadIdx.x; j < slots; j += blockDim.x) {
      if (j != threadIdx.x) col = sc[sw0 * 32 + j];
      u16 h[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) h[n] = n < N && col >= 0 ? x[(size_t)n * C + col] : (u16)0;
#pragma unroll
      for (int n = 0; n < NT; ++n)
        if (n < N) zs[n * ZSW + j] = h[n];
    }
  }
  if (threadIdx.x <= ncb) sf[threadIdx.x] = sfirst[cb0 + threadIdx.x];
  float* fw = fin + wid * 32 * NT8;
  __syncthreads();
  float am[2][NTILE][4], as[2][NTILE][4];  // [MMA tile][n-tile][fragment], main and salient
#pragma unroll
  for (int v = 0; v < 2; ++v)
#pragma unroll
    for (int h = 0; h < NTILE; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) am[v][h][j] = as[v][h][j] = 0.f;
  // this lane's token rows of the B fragments (n-tile h: token 8h + g, clamped to a real one)
  int zo[NTILE];
#pragma unroll
  for (int h = 0; h < NTILE; ++h) zo[h] = min(8 * h + g, N - 1);
#pragma unroll
  for (int s = 0; s < ST - 1; ++s)
    if (s < ncb) stage_sal(s, cb0 + s);
  commit();
#pragma unroll 1
  for (int b = 0; b < ncb; ++b) {
    // groups committed after block b's: blocks b + 1 .. b + ST - 2 (from b = 1 on; block 0 waits
    // for every prologue group)
    if (b == 0) wait_groups<0>(); else wait_groups<ST - 2>();
    if (b + ST - 1 < ncb) {  // into the stage block b - 1 used
      stage_main((b + ST - 1) % ST, cb0 + b + ST - 1);
      stage_sal((b + ST - 1) % ST, cb0 + b + ST - 1);
    }
    commit();
    const uint4* d = rw + (b % ST) * PPS * 32;
    const uint4 bm = d[NCP * 32], sb = d[(NCP + 1) * 32], s2 = d[(NCP + 2) * 32];
#pragma unroll
    for (int j = 0; j < GPB; ++j) {
      uint2 bk[4];
      books(j ? make_uint2(bm.z, bm.w) : make_uint2(bm.x, bm.y), g, bk);
#pragma unroll
      for (int i = j * WPGR; i < (j + 1) * WPGR; ++i) {
        uint4 bz[NTILE];
#pragma unroll
        for (int h = 0; h < NTILE; ++h)
          bz[h] = *reinterpret_cast<const uint4*>(zm + zo[h] * ZW + (b * WPB + i) * 32 + q * 8);
        const uint4 cw = d[(i / 2) * 32];
        word(am, i % 2 ? cw.z : cw.x, i % 2 ? cw.w : cw.y, bz, bk);
      }
    }
    const int f0 = sf[b], f1 = sf[b + 1];
    if (f0 < f1) {
      uint2 bk[4];
      books(make_uint2(sb.x, sb.y), g, bk);
      for (int w = f0; w < f1; ++w) {
        const uint2 cw = w == f0 ? make_uint2(sb.z, sb.w)
                       : w == f0 + 1 ? make_uint2(s2.x, s2.y) : cbs[((size_t)t * SW + w) * 32 + lane];
        uint4 bz[NTILE];
#pragma unroll
        for (int h = 0; h < NTILE; ++h)
          bz[h] = *reinterpret_cast<const uint4*>(zs + zo[h] * ZSW + (w - sw0) * 32 + q * 8);
        word(as, cw.x, cw.y, bz, bk);
      }
    }
#if TRIG == 3
    if (b == 0) dep_launch();
#endif
  }
#if TRIG == 2
  dep_launch();
#endif
  // fragments -> the warp's 32 output rows: element j of n-tile h is row g + 8 (j >> 1) of the
  // MMA tile, token 8h + 2q + (j & 1); salient (and col-layout main) tiles are the low (A) and
  // high (B) rows of pairs g + 8 (j >> 1), output rows 2p, 2p + 1. Plain stores: in each step a
  // (row, token) has one writer (row layout: the main tiles' rows, then the salient pairs added).
#pragma unroll
  for (int h = 0; h < NTILE; ++h)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = 8 * h + 2 * q + (j & 1), p = g + 8 * (j >> 1);
      if (n < N) {
#if ROW
        fw[p * NT8 + n] = am[0][h][j];
        fw[(16 + p) * NT8 + n] = am[1][h][j];
#else
        const float lo = am[0][h][j] + as[0][h][j], hi = am[1][h][j] + as[1][h][j];
        fw[2 * p * NT8 + n] = c * (lo + hi);
        fw[(2 * p + 1) * NT8 + n] = c * (lo - hi);
#endif
      }
    }
#if ROW
  __syncwarp();
#pragma unroll
  for (int h = 0; h < NTILE; ++h)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = 8 * h + 2 * q + (j & 1), p = g + 8 * (j >> 1);
      if (n < N) {
        const float lo = as[0][h][j], hi = as[1][h][j];
        fw[2 * p * NT8 + n] += c * (lo + hi);
        fw[(2 * p + 1) * NT8 + n] += c * (lo - hi);
      }
    }
#endif
  __syncwarp();
  const int row = 32 * tw + lane;
  const bool mine = tw < T && row < R;
  if (gridDim.y == 1) {
    if (mine)
      for (int n = 0; n < N; ++n) y[(size_t)n * R + row] = st(fw[lane * NT8 + n]);
    return;
  }
#if VEC
  if (mine)
    for (int n = 0; n < N; n += 4)
      red4(ws + (size_t)row * 16 + n, make_float4(fw[lane * NT8 + n], n + 1 < N ? fw[lane * NT8 + n + 1] : 0.f,
                                                  n + 2 < N ? fw[lane * NT8 + n + 2] : 0.f,
                                                  n + 3 < N ? fw[lane * NT8 + n + 3] : 0.f));
#else
  if (mine)
    for (int n = 0; n < N; ++n) atomicAdd(ws + (size_t)n * R + row, fw[lane * NT8 + n]);
#endif
  __threadfence();
  __syncthreads();
  bool last = false;
  if (threadIdx.x == 0) last = atomicAdd(cnt + blockIdx.x, 1u) == gridDim.y - 1;
  if (!__syncthreads_or(last)) return;
  __threadfence();
  // every token's sum is read before any output is written: the reads are in flight together
  // (a store between them would chain one L2 round trip per token)
  float v[NT];
#if VEC
#pragma unroll
  for (int n = 0; n < NT; n += 4)
    if (mine && n < N)
      asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                   : "=f"(v[n]), "=f"(v[n + 1]), "=f"(v[n + 2]), "=f"(v[n + 3])
                   : "l"(ws + (size_t)row * 16 + n) : "memory");
#pragma unroll
  for (int n = 0; n < NT; n += 4)
    if (mine && n < N)
      asm volatile("st.global.cg.v4.f32 [%0], {%1, %1, %1, %1};"
                   :: "l"(ws + (size_t)row * 16 + n), "f"(0.f) : "memory");
#else
#pragma unroll
  for (int n = 0; n < NT; ++n)
    if (mine && n < N) v[n] = atomicExch(ws + (size_t)n * R + row, 0.f);
#endif
#pragma unroll
  for (int n = 0; n < NT; ++n)
    if (mine && n < N) y[(size_t)n * R + row] = st(v[n]);
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0u;
}
"""


def macros(row: bool, nt: int, bs: int, cb: int, st: int, trig: int = 1) -> dict:
    """Compile-time constants: layout, tokens a launch (8 or 16), blocksize, blocks per chunk,
    stages of a warp's cp.async ring (blocks in flight + 1), where the next kernel may launch
    (:data:`CONFIG`'s ``pdl``: 1 at the start, 2 after the block loop, 3 after the first block)."""
    return dict(ROW=int(row), NT=nt, DT=0, BS=bs, CB=cb, SU=nt // 4, ST=st, TRIG=trig)


@functools.cache
def _kernel(row: bool, nt: int, bs: int, cb: int, st: int, device: int, trig: int = 1):
    name = f"hbllm_cb_{'row' if row else 'col'}_{nt}_{bs}_{cb}_{st}_t{trig}"
    return nvrtc.compile_kernel(SOURCE, name, device, **macros(row, nt, bs, cb, st, trig))


@functools.cache
def available() -> bool:
    """Whether the NVRTC kernel compiles here (CUDA, PyTorch >= 2.9, sm_80 or newer)."""
    return nvrtc.compiles(lambda: _kernel(True, 8, 128, CONFIG["cb"], CONFIG["st"],
                                           torch.cuda.current_device()), 8)


def bucket(tokens: int) -> int:
    """The token bucket (:data:`BUCKETS`) of a launch of 1-16 tokens."""
    return next(b for b in BUCKETS if tokens <= b)


def config(rows: int, cols: int, tokens: int) -> dict:
    """Launch config of a (rows, cols) layer at ``tokens`` tokens a launch: :data:`TUNED` at its
    bucket, else :data:`CONFIG`."""
    return TUNED.get((rows, cols, bucket(tokens)), CONFIG)


def buffers(rt: dict[str, torch.Tensor], meta: dict, scratch: dict) -> dict:
    """Per layer and device (kept in ``scratch``): the buffers of :func:`codebook.build`, a zeroed
    float32 workspace (MAX_TOKENS x rows floats) and tile counters (one per row tile, enough for any
    number of warps a block)."""
    key = ("codebook", str(rt["sal_first"].device))
    if key not in scratch:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the codebook GEMV builds its buffers at a layer's first call, which "
                               "synchronizes: call the layer once before capturing a CUDA graph")
        cbuf = codebook.build(rt, meta)
        tiles = (meta["rows"] + 31) // 32
        cbuf["ws"] = torch.zeros(MAX_TOKENS * meta["rows"], device=rt["sal_first"].device)
        cbuf["cnt"] = torch.zeros(tiles, device=rt["sal_first"].device, dtype=torch.int32)
        scratch[key] = cbuf
    return scratch[key]


def gemv(x: torch.Tensor, rt: dict[str, torch.Tensor], meta: dict, c: float,
         scratch: dict) -> torch.Tensor:
    """y (N, R) = x (N, C) W^T for fp16 x (N, C) contiguous on CUDA, 16 tokens a launch.
    ``scratch``: a dict the caller keeps per layer (buffers, workspace; calls on one layer must
    not overlap in time)."""
    n, cols = x.shape
    nt = 8 if n <= 8 else 16
    cfg = config(meta["rows"], cols, min(n, MAX_TOKENS))
    warps, cb, st = cfg["warps"], cfg["cb"], cfg["st"]
    if not 1 <= warps <= 8 or st < 2:
        raise ValueError(f"codebook GEMV config {cfg}: warps must be 1-8 (the kernel is built for "
                         "at most 256 threads a block) and st at least 2")
    bs, nb = meta["blocksize"], cols // meta["blocksize"]
    buf = buffers(rt, meta, scratch)
    pdl = cfg.get("pdl", 0)
    kernel = _kernel(meta["layout"] == "row", nt, bs, cb, st, nvrtc.device_index(x.device),
                     max(pdl, 1))
    tiles = (meta["rows"] + 31) // 32
    smax = min(cb * bs // 32, cb * scratch.get("block_sal_words", bs // 32))
    zw = ((cb * bs // 32) | 1) * 32
    zsw = (smax | 1) * 32
    ntile = 2 if nt > 8 else 1
    ring = 16 * warps * st * (bs // 64 + 3) * 32
    smem = ring + 2 * nt * (zw + zsw) + 4 * warps * 32 * 8 * ntile + 4 * (cb + 1)
    grid = ((tiles + warps - 1) // warps, (nb + cb - 1) // cb, 1)
    after_first = nvrtc.settled(scratch, ("cb", x.device))
    return nvrtc.launch(kernel, x, rt, meta, c, nt, grid, 32 * warps, smem,
                        extra=[rt["sal_first"], buf["cb_main"], buf["book_main"], buf["cb_sal"],
                               buf["book_sal"], buf["ws"], buf["cnt"], smax],
                        pdl=pdl > 0 and after_first)

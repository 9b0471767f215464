"""Few-token packed linear on tensor cores (``mma.m16n8k16``), compiled at first use with NVRTC.

Up to 16 tokens a launch: two n-tiles of 8 share every loaded word (where one token row of the
input per n-tile fits shared memory; else 8 tokens a launch).

Each coefficient of a statistics group is ``w = mid + amid S + dm G + da SG`` with ``S, G, SG``
in {-1, +1} (sign bit, group bit, and their agreement) and ``mid = (m0+m1)/2``,
``amid = (a0+a1)/2``, ``dm = (m1-m0)/2``, ``da = (a1-a0)/2``. So a 16-row tile times the input is
four tensor-core products -- an all-ones A (sum of z) and the three +-1 matrices -- combined with
the rows' statistics once per group. A +-1 fp16 (bf16) pair of an A fragment is one shift and one
LOP3 of a bit word (``(~w << sh) & 0x80008000 | ONE``) when the MMA's k order is permuted so that
a register's pair is bits ``(i, i + 16)`` of a word; the input is written to shared memory in that
order, so the words of :func:`hbllm.packed.runtime.build_runtime` are used unchanged.

A block owns one row tile of the tiled layout (16 row pairs, 32 output rows; an MMA's rows
``g, g + 8`` are lanes ``g, g + 8`` and ``g + 16, g + 24`` of the tile, so the four words a warp
loads for a word position lie in one 128-byte line, or 16-byte vectors of 4 words) and ``ksplit``
warps that split the words (whole quantization blocks for the main band, any words for the
salient residual), then reduce in shared memory.
Row layout: main tiles are output rows ``2p0 .. 2p0+31``, salient tiles the pairs' low and high
rows, combined as ``y[2p] += c(lo + hi)``, ``y[2p+1] += c(lo - hi)``. Col layout: main and
salient both feed the low/high tiles of the pair output.
"""
from __future__ import annotations

import functools

import torch

from . import nvrtc

MAX_TOKENS = 16  # two n-tiles of the MMA (8 tokens each) share each loaded word
# Warps per block: CONFIG, the fallback (best of scripts/bench_kernel.py --tune summed over the 7B
# shapes on an H100, row-major layout); TUNED per (rows, cols, tokens), as ``--tune`` prints it.
CONFIG = {"ksplit": 16}
TUNED: dict[tuple, dict] = {  # H200, 2026-11-29 (experiments/benchmarks/raw/kernel_tiled_2026-11-29.json)
    (4096, 4096, 8): {"ksplit": 16}, (4096, 4096, 16): {"ksplit": 8},
    (11008, 4096, 8): {"ksplit": 16}, (11008, 4096, 16): {"ksplit": 16},
    (4096, 11008, 8): {"ksplit": 8}, (4096, 11008, 16): {"ksplit": 4},
}

SOURCE = r"""
#if DT == 0
#define ONE 0x3C003C00u
#define MMA_T "f16"
#else
#define ONE 0x3F803F80u
#define MMA_T "bf16"
#endif
__device__ __forceinline__ void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_T "." MMA_T ".f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// position in the MMA k order (within a 32-column word) of bit b: pair register (tau, r) of lane q
// holds bits (i, i + 16), i = 8 tau + 4 r + q, at k = 16 tau + 8 r + 2 q + (b >> 4)
__device__ __forceinline__ int kpos(int b) {
  const int i = b & 15;
  return ((i >> 3) << 4) + (((i >> 2) & 1) << 3) + ((i & 3) << 1) + (b >> 4);
}
#define NTILE (NT > 8 ? 2 : 1)  // n-tiles of 8 tokens
#define NT8 (8 * NTILE)         // tokens of the fin rows
__device__ __forceinline__ unsigned pm(unsigned neg, int sh) { return ((neg << sh) & 0x80008000u) | ONE; }
struct Acc { float t[4], s[4], g[4], x[4]; };
__device__ __forceinline__ void clear(Acc& A) {
#pragma unroll
  for (int j = 0; j < 4; ++j) A.t[j] = A.s[j] = A.g[j] = A.x[j] = 0.f;
}
// one 32-column word of a 16-row tile: (s0, g0) of row g, (s1, g1) of row g + 8; zb: this lane's
// token row of the input at the word (u32 units)
__device__ __forceinline__ void word(Acc& A, unsigned s0, unsigned g0, unsigned s1, unsigned g1,
                                     const unsigned* zb, int q, const int* sh) {
  const unsigned ns0 = ~s0, ng0 = ~g0, nx0 = s0 ^ g0, ns1 = ~s1, ng1 = ~g1, nx1 = s1 ^ g1;
  const unsigned ones[4] = {ONE, ONE, ONE, ONE};
#pragma unroll
  for (int tau = 0; tau < 2; ++tau) {
    const unsigned b0 = zb[8 * tau + q], b1 = zb[8 * tau + 4 + q];
    const int h0 = sh[2 * tau], h1 = sh[2 * tau + 1];
    mma(A.t, ones, b0, b1);
    unsigned a[4] = {pm(ns0, h0), pm(ns1, h0), pm(ns0, h1), pm(ns1, h1)};
    mma(A.s, a, b0, b1);
    unsigned c[4] = {pm(ng0, h0), pm(ng1, h0), pm(ng0, h1), pm(ng1, h1)};
    mma(A.g, c, b0, b1);
    unsigned e[4] = {pm(nx0, h0), pm(nx1, h0), pm(nx0, h1), pm(nx1, h1)};
    mma(A.x, e, b0, b1);
  }
}
// out (rows g, g+8; tokens 2q, 2q+1) += the group's sums weighted by the rows' statistics
__device__ __forceinline__ void flush(float* out, Acc& A, uint2 t0, uint2 t1) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint2 t = h ? t1 : t0;
    const float4 v = stats4(t);
    const float m0 = v.x, a0 = v.y, m1 = v.z, a1 = v.w;
    const float mid = 0.5f * (m0 + m1), amid = 0.5f * (a0 + a1), dm = 0.5f * (m1 - m0), da = 0.5f * (a1 - a0);
#pragma unroll
    for (int j = 2 * h; j < 2 * h + 2; ++j)
      out[j] += mid * A.t[j] + amid * A.s[j] + dm * A.g[j] + da * A.x[j];
  }
  clear(A);
}
// two 16-row tiles of a band, words [w0, w1), tiled layout (runtime.py) with V words per lane
// vector: lanes (g, g + 8) of row tile t into o1, lanes (g + 16, g + 24) into o2; group of word w:
// w / wpg, or grp[w]. All loads of UW words are issued before their products; VL: 16-byte loads
// (V == UW, w0 and w1 multiples of UW).
#define UW 4
template <int VL>
__device__ __forceinline__ void band2(float (*o1)[4], float (*o2)[4],
    const unsigned* __restrict__ sg, const unsigned* __restrict__ mb,
    const uint2* __restrict__ stats, const int* __restrict__ grp,
    int wpg, int t, int g, int W, int V, int G, int SV, int w0, int w1, const unsigned* z,
    int zstride, int q, const int* sh) {
  Acc A[NTILE], B[NTILE];  // per n-tile of 8 tokens (this lane's token rows: z, z + zstride)
#pragma unroll
  for (int h = 0; h < NTILE; ++h) {
    clear(A[h]);
    clear(B[h]);
  }
  for (int wb = w0; wb < w1; wb += UW) {
    unsigned vs[UW][4], vm[UW][4];
    int gw[UW + 1];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (VL) {
        const size_t at = ((size_t)t * (W / UW) + wb / UW) * 32 + g + 8 * k;
        const uint4 a = reinterpret_cast<const uint4*>(sg)[at];
        const uint4 b = reinterpret_cast<const uint4*>(mb)[at];
        vs[0][k] = a.x; vs[1][k] = a.y; vs[2][k] = a.z; vs[3][k] = a.w;
        vm[0][k] = b.x; vm[1][k] = b.y; vm[2][k] = b.z; vm[3][k] = b.w;
      } else {
#pragma unroll
        for (int u = 0; u < UW; ++u) {
          const size_t at = tidx(t, min(wb + u, w1 - 1), g + 8 * k, W, V);
          vs[u][k] = sg[at];
          vm[u][k] = mb[at];
        }
      }
    }
#pragma unroll
    for (int u = 0; u <= UW; ++u) {
      const int w = wb + u;
      gw[u] = w >= w1 ? -1 : grp ? grp[w] : w / wpg;
    }
#pragma unroll
    for (int u = 0; u < UW; ++u) {
      const int w = wb + u;
      if (w < w1) {
#pragma unroll
        for (int h = 0; h < NTILE; ++h) {
          word(A[h], vs[u][0], vm[u][0], vs[u][1], vm[u][1], z + h * zstride + w * 16, q, sh);
          word(B[h], vs[u][2], vm[u][2], vs[u][3], vm[u][3], z + h * zstride + w * 16, q, sh);
        }
        if (gw[u + 1] != gw[u]) {
          const int gg = gw[u];
          const uint2 ta = stats[tidx(t, gg, g, G, SV)], tb = stats[tidx(t, gg, g + 8, G, SV)];
          const uint2 tc = stats[tidx(t, gg, g + 16, G, SV)];
          const uint2 td = stats[tidx(t, gg, g + 24, G, SV)];
#pragma unroll
          for (int h = 0; h < NTILE; ++h) {
            flush(o1[h], A[h], ta, tb);
            flush(o2[h], B[h], tc, td);
          }
        }
      }
    }
  }
}
// at most 16 warps (8 with two n-tiles), so the registers of a block always fit an SM
extern "C" __global__ void __launch_bounds__(NTILE == 2 ? 256 : 512) NAME(PACKED_ARGS) {
  extern __shared__ unsigned smem[];
  const int W = C >> 5, KS = blockDim.x >> 5;
  const int ZR = (C >> 1) + 4, ZSR = SW * 16 + 4;  // u32 per token row (the +4 spreads the banks)
  unsigned* z = smem;                               // [NT][ZR] main input, MMA k order
  unsigned* zs = z + NT * ZR;                       // [NT][ZSR] x at the salient slots
  float* red = reinterpret_cast<float*>(zs + NT * ZSR);  // [KS][NTILE][4 tiles][32 lanes][4]
  float* fin = red + KS * 512 * NTILE;              // [4 tiles][16 rows][NT tokens]
  u16* zh = reinterpret_cast<u16*>(z);
  u16* zsh = reinterpret_cast<u16*>(zs);
  const float c = (float)cd;
  // inputs -> shared memory in the MMA k order: 8 columns (16 bytes) per item, SU items of a
  // thread loaded before any is stored, so the loads overlap instead of queuing one by one
  const int per = C >> 3, items = N * per;
  for (int base = threadIdx.x; base < items; base += SU * blockDim.x) {
    uint4 v[SU];
#if !ROW
    uint2 kp[SU];
#endif
#pragma unroll
    for (int u = 0; u < SU; ++u) {
      const int it = base + u * blockDim.x;
      if (it < items) {
        v[u] = reinterpret_cast<const uint4*>(x)[it];  // token rows are C (a multiple of 8) apart
#if !ROW
        kp[u] = reinterpret_cast<const uint2*>(keep)[it % per];
#endif
      }
    }
#pragma unroll
    for (int u = 0; u < SU; ++u) {
      const int it = base + u * blockDim.x;
      if (it < items) {
        const int n = it / per, j0 = (it - n * per) * 8;
        u16* zn = zh + n * 2 * ZR;
        const unsigned two[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#if ROW
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // column pair (j0/2 + k) of block b -> Haar low / high
          const float e = ld((u16)(two[k] & 0xffff)), o = ld((u16)(two[k] >> 16));
          const int qq = (j0 >> 1) + k, b = qq / (BS / 2), j = b * BS + (qq - b * (BS / 2));
          const int j2 = j + BS / 2;
          zn[(j & ~31) + kpos(j & 31)] = st((e + o) * c);
          zn[(j2 & ~31) + kpos(j2 & 31)] = st((e - o) * c);
        }
#else
        const unsigned kk[2] = {kp[u].x, kp[u].y};
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int j = j0 + k;
          const u16 h = (u16)(k & 1 ? two[k >> 1] >> 16 : two[k >> 1] & 0xffff);
          zn[(j & ~31) + kpos(j & 31)] = (kk[k >> 2] >> (8 * (k & 3))) & 0xff ? h : (u16)0;
        }
#endif
      }
    }
  }
  for (int j = threadIdx.x; j < SW * 32; j += blockDim.x) {  // x at the salient slots, all tokens
    const int col = sc[j];
    u16 h[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) h[n] = col >= 0 && n < N ? x[(size_t)n * C + col] : (u16)0;
#pragma unroll
    for (int n = 0; n < NT; ++n)
      if (n < N) zsh[n * 2 * ZSR + (j & ~31) + kpos(j & 31)] = h[n];
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, kw = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  int sh[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) sh[k] = 15 - (4 * k + q);  // (tau, r) = (k >> 1, k & 1): i = 8 tau + 4 r + q
  const int tok = g < N ? g : N - 1;  // this lane's token row (n-tile 0; n-tile 1: 8 on)
#if NTILE == 2
  const int zstep = (g + 8 < N ? g + 8 : N - 1) - tok;
#else
  const int zstep = 0;
#endif
  const unsigned* zt = z + tok * ZR;
  const unsigned* zst = zs + tok * ZSR;
  const int tile = blockIdx.x, p0 = tile * 16;  // row tile: lanes g, g + 8, g + 16, g + 24 of it
  // warps split the main words by whole quantization blocks (so by groups, and on vectors)
  const int m0 = (NB * kw / KS) * (BS / 32), m1 = (NB * (kw + 1) / KS) * (BS / 32);
  const int s0 = SW * kw / KS, s1 = SW * (kw + 1) / KS;
  float out[4][NTILE][4];  // [row tile: main 0/1 or pair low/high 2/3][n-tile][fragment]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int h = 0; h < NTILE; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) out[i][h][j] = 0.f;
#if ROW
  band2<MV == UW>(out[0], out[1], ms, mm, mst, nullptr, WPG, tile, g, W, MV, G, MSV, m0, m1, zt,
                  zstep * ZR, q, sh);
#else
  band2<MV == UW>(out[2], out[3], ms, mm, mst, nullptr, WPG, tile, g, W, MV, G, MSV, m0, m1, zt,
                  zstep * ZR, q, sh);
#endif
  band2<0>(out[2], out[3], ss, sm, sst, sgrp, 1, tile, g, SW, 1, NB, SSV, s0, s1, zst,
           zstep * ZSR, q, sh);
#pragma unroll
  for (int t = 0; t < 4; ++t)
#pragma unroll
    for (int h = 0; h < NTILE; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        red[(((kw * NTILE + h) * 4 + t) * 32 + lane) * 4 + j] = out[t][h][j];
  __syncthreads();
  for (int i = threadIdx.x; i < 512 * NTILE; i += blockDim.x) {  // i = (n-tile, tile, lane, j)
    float v = 0.f;
    for (int k = 0; k < KS; ++k) v += red[k * 512 * NTILE + i];
    const int h = i >> 9, t = (i >> 7) & 3, l = (i >> 2) & 31, j = i & 3;
    const int row = (l >> 2) + 8 * (j >> 1), tk = 8 * h + 2 * (l & 3) + (j & 1);
    fin[(t * 16 + row) * NT8 + tk] = v;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * N; i += blockDim.x) {  // i = (token, output row of the block)
    const int n = i >> 5, o = i & 31, pp = o >> 1, orow = 2 * p0 + o;
    if (orow >= R) continue;
    const float lo = fin[(2 * 16 + pp) * NT8 + n], hi = fin[(3 * 16 + pp) * NT8 + n];
    const float pair = c * ((o & 1) ? lo - hi : lo + hi);
#if ROW
    const float v = fin[((o >> 4) * 16 + (o & 15)) * NT8 + n] + pair;
#else
    const float v = pair;
#endif
    y[(size_t)n * R + orow] = st(v);
  }
}
"""


@functools.cache
def _kernel(row: bool, nt: int, bf16: bool, bs: int, mv: int, msv: int, ssv: int, device: int):
    name = (f"hbllm_mma_{'row' if row else 'col'}_{nt}_{'bf16' if bf16 else 'fp16'}_{bs}"
            f"_{mv}{msv}{ssv}")
    return nvrtc.compile_kernel(SOURCE, name, device, **macros(row, nt, bf16, bs, mv, msv, ssv))


def macros(row: bool, nt: int, bf16: bool, bs: int, mv: int, msv: int, ssv: int) -> dict:
    """Compile-time constants: layout, tokens a launch, dtype, blocksize, main word vector, main
    and salient statistics vectors (runtime.word_vec / stats_vec)."""
    return dict(ROW=int(row), NT=nt, DT=int(bf16), BS=bs, MV=mv, MSV=msv, SSV=ssv, SU=8)


@functools.cache
def available() -> bool:
    """Whether the NVRTC kernel compiles here (CUDA, PyTorch >= 2.9, sm_80 or newer)."""
    return nvrtc.compiles(lambda: _kernel(True, 1, False, 128, 4, 2, 2, torch.cuda.current_device()), 8)


def config(rows: int, cols: int, nt: int) -> dict:
    """Launch config of a (rows, cols) layer at ``nt`` tokens a launch: :data:`TUNED`, else
    :data:`CONFIG`."""
    return TUNED.get((rows, cols, nt), CONFIG)


def smem_bytes(cols: int, sal_words: int, nt: int, ksplit: int) -> int:
    ntile = 2 if nt > 8 else 1
    return 4 * (nt * (cols // 2 + 4 + sal_words * 16 + 4) + ksplit * 512 * ntile + 512 * ntile)


def warps(ksplit: int, nt: int) -> int:
    """Warps of a launch: ``ksplit``, at most 8 with two n-tiles (their registers: 256 threads)."""
    return min(ksplit, 8) if nt > 8 else ksplit


def fits(cols: int, sal_words: int, device: torch.device) -> bool:
    """Whether one token's inputs fit in a block's shared memory (at the fallback config)."""
    return smem_bytes(cols, sal_words, 1, CONFIG["ksplit"]) <= nvrtc.smem_limit(nvrtc.device_index(device))


def gemv(x: torch.Tensor, rt: dict[str, torch.Tensor], meta: dict, c: float) -> torch.Tensor:
    """y (N, R) = x (N, C) W^T for up to a few tokens, fp16 or bf16, x contiguous on CUDA."""
    n, cols = x.shape
    sal_words = rt["sal_wgrp"].numel()
    device = nvrtc.device_index(x.device)
    nt = 1
    while (nt < min(n, MAX_TOKENS) and smem_bytes(cols, sal_words, 2 * nt,
                                                   warps(CONFIG["ksplit"], 2 * nt))
           <= nvrtc.smem_limit(device)):
        nt *= 2
    ksplit = warps(config(meta["rows"], cols, nt)["ksplit"], nt)
    if smem_bytes(cols, sal_words, nt, ksplit) > nvrtc.smem_limit(device):
        ksplit = warps(CONFIG["ksplit"], nt)
    mv, msv, ssv = rt["main_sign"].shape[-1], rt["main_stats"].shape[-2], rt["sal_stats"].shape[-2]
    kernel = _kernel(meta["layout"] == "row", nt, x.dtype == torch.bfloat16, meta["blocksize"],
                     mv, msv, ssv, device)
    grid = ((meta["rows"] // 2 + 15) // 16, 1, 1)
    return nvrtc.launch(kernel, x, rt, meta, c, nt, grid, 32 * ksplit,
                        smem_bytes(cols, sal_words, nt, ksplit))

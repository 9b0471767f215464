"""Decode-time (few tokens) packed linear as a CUDA kernel compiled at first use with NVRTC.

One warp per output row pair ``p``; its lanes stride over the 32-coefficient words of the pair's
band rows, so a warp reads 128 contiguous bytes per array and word. The block first writes the
kernel's input to shared memory: the Haar-domain ``z`` (row layout) or ``x`` at the non-salient
columns (col layout), and ``x`` at the salient slots, 36 floats per word (32 used) so that the
``float4`` reads of a warp hit distinct banks. A coefficient costs two bit tests, three selects
among the row group's ``mean -+ scale`` values and one FMA per token.

* row layout: main band rows ``2p, 2p+1`` are output rows; the salient residual rows ``p`` (low)
  and ``p + R/2`` (high) add ``c(lo + hi)`` and ``c(lo - hi)``.
* col layout: main and salient rows ``p, p + R/2`` both feed the pair output.

Buffers are those of :func:`hbllm.packed.runtime.build_runtime` (no extra copy).
:mod:`hbllm.packed.nvrtc` compiles it (PyTorch >= 2.9) and launches it; :func:`available` says whether it
can run here, and the module falls back to Triton otherwise.
"""
from __future__ import annotations

import functools
from typing import Dict

import torch

from . import nvrtc

ZS = 36  # floats per word slot in shared memory
MAX_TOKENS = 4
# Launch config: row pairs (warps) per block, words per lane loaded at once. Best of
# ``scripts/bench_kernel.py --tune`` on an H100 (experiments/benchmarks/RESULTS.md).
CONFIG = {"warps": 16, "unroll": 2}

_SOURCE = r"""
#define ZS 36
// (m0 - a0, m0 + a0, m1 - a1, m1 + a1) from fp16 stats [m0, a0, m1, a1]
__device__ __forceinline__ float4 vals(uint2 s) {
  const float4 t = stats4(s);
  return make_float4(t.x - t.y, t.x + t.y, t.z - t.w, t.z + t.w);
}
// acc[n] += sum_t w_t z[n][t] over the 32 coefficients of word (s, g)
__device__ __forceinline__ void word(float* acc, unsigned s, unsigned g, float4 v,
                                     const float* z, int zstride) {
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    float4 zz[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) zz[n] = *reinterpret_cast<const float4*>(z + n * zstride + 4 * q);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const unsigned bit = 1u << (4 * q + u);
      const float lo = (s & bit) ? v.y : v.x, hi = (s & bit) ? v.w : v.z;
      const float w = (g & bit) ? hi : lo;
#pragma unroll
      for (int n = 0; n < NT; ++n)
        acc[n] = fmaf(w, u == 0 ? zz[n].x : u == 1 ? zz[n].y : u == 2 ? zz[n].z : zz[n].w, acc[n]);
    }
  }
}
struct Batch { unsigned s0[U], g0[U], s1[U], g1[U]; uint2 t0[U], t1[U]; };
// Loads the words it0*32 + lane + 32u (u < U) of rows a, b (stats group = word / WPG, or grp[])
__device__ __forceinline__ void load(Batch& B, const unsigned* __restrict__ sgn,
    const unsigned* __restrict__ mem, const uint2* __restrict__ stats, const int* __restrict__ grp,
    int wpg, int a, int b, int W, int G, int w0) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int w = w0 + 32 * u;
    const bool ok = w < W;
    const int g = ok ? (grp ? grp[w] : w / wpg) : 0;
    B.s0[u] = ok ? sgn[(size_t)a * W + w] : 0u;
    B.g0[u] = ok ? mem[(size_t)a * W + w] : 0u;
    B.s1[u] = ok ? sgn[(size_t)b * W + w] : 0u;
    B.g1[u] = ok ? mem[(size_t)b * W + w] : 0u;
    B.t0[u] = ok ? stats[(size_t)a * G + g] : make_uint2(0u, 0u);
    B.t1[u] = ok ? stats[(size_t)b * G + g] : make_uint2(0u, 0u);
  }
}
__device__ __forceinline__ void compute(const Batch& B, float* acc0, float* acc1, const float* z,
                                        int zstride, int W, int w0) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int w = w0 + 32 * u;
    if (w < W) {
      word(acc0, B.s0[u], B.g0[u], vals(B.t0[u]), z + w * ZS, zstride);
      word(acc1, B.s1[u], B.g1[u], vals(B.t1[u]), z + w * ZS, zstride);
    }
  }
}
extern "C" __global__ void NAME(PACKED_ARGS) {
  extern __shared__ float4 smem4[];
  const int W = C >> 5;
  float* z = reinterpret_cast<float*>(smem4);  // [NT][W][ZS] main input
  float* zs = z + NT * W * ZS;                 // [NT][SW][ZS] x at the salient slots
  const float c = (float)cd;
  const int lane = threadIdx.x & 31, P = R >> 1;
  const int pw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const bool live = pw < P;
  const int p = live ? pw : P - 1;  // dead warps load a valid pair and store nothing
#if ROW
  const int r0 = 2 * p, r1 = 2 * p + 1;
#else
  const int r0 = p, r1 = p + P;
#endif
  Batch B;
  load(B, ms, mm, mst, nullptr, WPG, r0, r1, W, G, lane);  // in flight during the input prologue
  for (int n = 0; n < N; ++n) {
    const u16* xn = x + (size_t)n * C;
#if ROW
    // column pair (2q, 2q+1) of block b -> z[b*BS + kk] = c(e + o), z[b*BS + BS/2 + kk] = c(e - o)
    for (int q = threadIdx.x; q < (C >> 1); q += blockDim.x) {
      const unsigned two = reinterpret_cast<const unsigned*>(xn)[q];
      const float e = ld((u16)(two & 0xffff)), o = ld((u16)(two >> 16));
      const int b = q / (BS / 2), j = b * BS + (q - b * (BS / 2));
      float* zn = z + n * W * ZS;
      zn[(j >> 5) * ZS + (j & 31)] = (e + o) * c;
      const int j2 = j + BS / 2;
      zn[(j2 >> 5) * ZS + (j2 & 31)] = (e - o) * c;
    }
#else
    for (int j = threadIdx.x; j < C; j += blockDim.x)
      z[(n * W + (j >> 5)) * ZS + (j & 31)] = keep[j] ? ld(xn[j]) : 0.f;
#endif
    for (int j = threadIdx.x; j < SW * 32; j += blockDim.x) {
      const int col = sc[j];
      zs[(n * SW + (j >> 5)) * ZS + (j & 31)] = col >= 0 ? ld(xn[col]) : 0.f;
    }
  }
  __syncthreads();
  float a0[NT], a1[NT], lo[NT], hi[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) a0[n] = a1[n] = lo[n] = hi[n] = 0.f;
  for (int w0 = lane;; ) {
#if ROW
    compute(B, a0, a1, z, W * ZS, W, w0);
#else
    compute(B, lo, hi, z, W * ZS, W, w0);
#endif
    w0 += 32 * U;
    if (w0 >= W) break;
    load(B, ms, mm, mst, nullptr, WPG, r0, r1, W, G, w0);
  }
  for (int w0 = lane; w0 < SW; w0 += 32 * U) {
    load(B, ss, sm, sst, sgrp, 1, p, p + P, SW, NB, w0);
    compute(B, lo, hi, zs, SW * ZS, SW, w0);
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a0[n] += __shfl_xor_sync(0xffffffffu, a0[n], o);
      a1[n] += __shfl_xor_sync(0xffffffffu, a1[n], o);
      lo[n] += __shfl_xor_sync(0xffffffffu, lo[n], o);
      hi[n] += __shfl_xor_sync(0xffffffffu, hi[n], o);
    }
  }
  if (live && lane == 0) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      if (n < N) {
        y[(size_t)n * R + 2 * p] = st(a0[n] + c * (lo[n] + hi[n]));
        y[(size_t)n * R + 2 * p + 1] = st(a1[n] + c * (lo[n] - hi[n]));
      }
    }
  }
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(row: bool, nt: int, bf16: bool, bs: int, unroll: int, device: int):
    name = f"hbllm_gemv_{'row' if row else 'col'}_{nt}_{'bf16' if bf16 else 'fp16'}_{bs}_{unroll}"
    return nvrtc.compile_kernel(_SOURCE, name, device, ROW=int(row), NT=nt, DT=int(bf16), BS=bs, U=unroll)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the NVRTC kernel compiles and runs on the current CUDA device."""
    if not nvrtc.supported():
        return False
    try:
        _kernel(True, 1, False, 128, CONFIG["unroll"], torch.cuda.current_device())
        return True
    except Exception:  # no NVRTC, an old driver, ...: the Triton kernels stay in use
        return False


def smem_bytes(cols: int, sal_words: int, nt: int) -> int:
    return 4 * nt * (cols // 32 + sal_words) * ZS


def fits(cols: int, sal_words: int, device: torch.device) -> bool:
    """Whether one token's inputs fit in a block's shared memory."""
    return smem_bytes(cols, sal_words, 1) <= nvrtc.smem_limit(nvrtc.device_index(device))


def gemv(x: torch.Tensor, rt: Dict[str, torch.Tensor], meta: dict, c: float) -> torch.Tensor:
    """y (N, R) = x (N, C) W^T for few tokens, fp16 or bf16, x contiguous on CUDA."""
    n, cols = x.shape
    sal_words, device = rt["sal_wgrp"].numel(), nvrtc.device_index(x.device)
    per_token = smem_bytes(cols, sal_words, 1)
    chunk = max(1, min(MAX_TOKENS, nvrtc.smem_limit(device) // per_token, n))
    nt = 1 << (chunk.bit_length() - 1)  # 1, 2 or 4 tokens per launch
    warps, unroll = CONFIG["warps"], CONFIG["unroll"]
    kernel = _kernel(meta["layout"] == "row", nt, x.dtype == torch.bfloat16, meta["blocksize"],
                     unroll, device)
    grid = ((meta["rows"] // 2 + warps - 1) // warps, 1, 1)
    return nvrtc.launch(kernel, x, rt, meta, c, nt, grid, 32 * warps, smem_bytes(cols, sal_words, nt))

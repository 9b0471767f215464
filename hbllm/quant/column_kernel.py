"""GPTQ's in-block column loop as one Triton kernel (CUDA; imports triton).

Inside a block the rows are independent, so a program takes ``BR`` rows of the block ``(R, b)``
into registers and walks its ``b`` columns: round column ``i`` to its grid, ``e = (w - q) / U[i,i]``,
``w -= e * U[i, :]`` (``U`` upper triangular, so only the later columns change). One launch per
block replaces ~13 tensor operations per column. Divisions are correctly rounded, rounding is
half-to-even and multiply-add contraction is off, so the result equals the tensor-operation loop
(:func:`hbllm.quant.gptq.column_loop` with ``backend="torch"``) bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gptq import ColumnGrids

BLOCK_ROWS = 32  # rows per program: scripts/bench_column_kernel.py on an H200 (RESULTS.md)
NUM_WARPS = 8


@triton.jit
def _round_half_even(x):
    # 1.5 * 2^23: adding and subtracting it rounds to an integer, ties to even, for |x| < 2^22;
    # larger |x| is clamped to the grid afterwards either way.
    big = 12582912.0
    return (x + big) - big


@triton.jit
def _block_kernel(w_ptr, u_ptr, s_ptr, z_ptr, bin_ptr, m_ptr, a_ptr, q_ptr, code_ptr, err_ptr,
                  R, B, sw, su, ss_r, ss_c, sz_r, sz_c, sb_r, sb_c, sm_r, sm_c, sa_r, sa_c, maxq,
                  HAS_BIN: tl.constexpr, BR: tl.constexpr, BB: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BB)
    rmask = rows < R
    cmask = cols < B
    w = tl.load(w_ptr + rows[:, None] * sw + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0)
    for i in range(B):
        x = tl.sum(tl.where(cols[None, :] == i, w, 0.0), axis=1)
        s = tl.load(s_ptr + rows * ss_r + i * ss_c, mask=rmask, other=1.0)
        z = tl.load(z_ptr + rows * sz_r + i * sz_c, mask=rmask, other=0.0)
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, s)) + z, 0.0), maxq)
        q = s * (code - z)
        if HAS_BIN:
            b = tl.load(bin_ptr + rows * sb_r + i * sb_c, mask=rmask, other=0)
            m = tl.load(m_ptr + rows * sm_r + i * sm_c, mask=rmask, other=0.0)
            a = tl.load(a_ptr + rows * sa_r + i * sa_c, mask=rmask, other=0.0)
            sign = tl.where(x > m, 1.0, tl.where(x < m, -1.0, 0.0))
            q = tl.where(b != 0, sign * a + m, q)
            code = tl.where(b != 0, sign, code)
        e = tl.math.div_rn(x - q, tl.load(u_ptr + i * su + i))
        u = tl.load(u_ptr + i * su + cols, mask=cmask & (cols >= i), other=0.0)
        w = w - e[:, None] * u[None, :]
        tl.store(q_ptr + rows * B + i, q, mask=rmask)
        tl.store(code_ptr + rows * B + i, code, mask=rmask)
        tl.store(err_ptr + rows * B + i, e, mask=rmask)


def block_columns(W1: torch.Tensor, U1: torch.Tensor, grids: ColumnGrids):
    """``(Q, codes, err)`` ``(R, b)`` float32 of the block ``W1`` ``(R, b)`` (row stride any,
    column stride 1) with ``U1`` ``(b, b)`` the block of the upper Cholesky factor of ``H^-1``."""
    R, B = W1.shape
    if W1.stride(1) != 1:
        W1 = W1.contiguous()
    U1 = U1.contiguous()
    Q, codes, err = (torch.empty(R, B, device=W1.device, dtype=torch.float32) for _ in range(3))
    has_bin = grids.binary is not None
    s, z = grids.scale, grids.zero
    b, m, a = (grids.binary.to(torch.int8), grids.mean, grids.alpha) if has_bin else (s, s, s)
    _block_kernel[(triton.cdiv(R, BLOCK_ROWS),)](
        W1, U1, s, z, b, m, a, Q, codes, err, R, B, W1.stride(0), U1.stride(0),
        *s.stride(), *z.stride(), *b.stride(), *m.stride(), *a.stride(), float(grids.maxq),
        HAS_BIN=has_bin, BR=BLOCK_ROWS, BB=triton.next_power_of_2(B), num_warps=NUM_WARPS,
        enable_fp_fusion=False)
    return Q, codes, err

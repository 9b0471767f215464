"""Slow loop-form references of RTN and GPTQ (tests only), written from the GPTQ paper
(arXiv 2210.17323, Algorithm 1) and IST-DASLab/gptq: plain Python floats (double), loops over
rows and columns, the *non-lazy* update (every later column updated right after each column),
min-max grids computed entry by entry. The fast library (hbllm.quant) must match them."""
from __future__ import annotations

import torch


def minmax(values, maxq: int, sym: bool):
    """(scale, zero) of the min-max grid of a list of floats: range [min(., 0), max(., 0)]
    (symmetric: [-m, m] when the minimum is negative), all-zero range -> [-1, 1]."""
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    if sym:
        hi = max(abs(lo), hi)
        if lo < 0:
            lo = -hi
    if lo == 0 and hi == 0:
        lo, hi = -1.0, 1.0
    scale = (hi - lo) / maxq
    zero = (maxq + 1) / 2 if sym else float(round(-lo / scale))
    return scale, zero


def grid_value(x: float, scale: float, zero: float, maxq: int) -> float:
    q = min(max(float(round(x / scale)) + zero, 0.0), float(maxq))
    return scale * (q - zero)


def upper_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian, float64 (dead inputs set to 1)."""
    H = H.double().clone()
    for j in range(H.shape[0]):
        if H[j, j] == 0:
            H[j, j] = 1.0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.linalg.inv(H)).T


def rtn(W: torch.Tensor, wbits: int, groupsize: int) -> torch.Tensor:
    """Every row, every group of columns on its own asymmetric min-max grid."""
    R, C = W.shape
    gs = C if groupsize == -1 else groupsize
    maxq = 2 ** wbits - 1
    out = torch.zeros(R, C, dtype=torch.float64)
    for r in range(R):
        for g0 in range(0, C, gs):
            vals = [float(W[r, c]) for c in range(g0, min(g0 + gs, C))]
            scale, zero = minmax(vals, maxq, False)
            for c in range(g0, min(g0 + gs, C)):
                out[r, c] = grid_value(float(W[r, c]), scale, zero, maxq)
    return out


def gptq(W: torch.Tensor, H: torch.Tensor, wbits: int, groupsize: int = -1, sym: bool = False,
         act_order: bool = False, static_groups: bool = False, blocksize: int = 128,
         percdamp: float = 0.01):
    """Returns (Q (R, C) float64, GPTQ loss sum((w - q)^2 / d^2) / 2).

    Grids: groupsize -1: one per row from the weight as given; static groups: per original
    column group from the weight with dead inputs zeroed; otherwise a group's grid comes from its
    columns as they stand at the start of the block (of ``blocksize`` columns) where the group
    starts, in processing order (the authors' code)."""
    R, C = W.shape
    maxq = 2 ** wbits - 1
    w = [[float(W[r, c]) for c in range(C)] for r in range(R)]
    row_grid = [minmax(w[r], maxq, sym) for r in range(R)]
    dead = [float(H[c, c]) == 0 for c in range(C)]
    for r in range(R):
        for c in range(C):
            if dead[c]:
                w[r][c] = 0.0
    static = {}
    if groupsize != -1 and static_groups:
        for r in range(R):
            for g0 in range(0, C, groupsize):
                static[r, g0 // groupsize] = minmax(w[r][g0:g0 + groupsize], maxq, sym)
    diag = [1.0 if dead[c] else float(H[c, c]) for c in range(C)]
    order = sorted(range(C), key=lambda c: -diag[c]) if act_order else list(range(C))
    Hp = H[order][:, order]
    U = upper_inverse_cholesky(Hp, percdamp).tolist()
    w = [[row[c] for c in order] for row in w]  # processing order
    Q = [[0.0] * C for _ in range(R)]
    loss = 0.0
    snapshot = None
    grids = {}
    for j in range(C):
        if j % blocksize == 0:
            snapshot = [row[:] for row in w]
        for r in range(R):
            if groupsize == -1:
                scale, zero = row_grid[r]
            elif static_groups:
                scale, zero = static[r, order[j] // groupsize]
            else:
                g0 = j // groupsize * groupsize
                if (r, g0) not in grids:
                    grids[r, g0] = minmax(snapshot[r][g0:g0 + groupsize], maxq, sym)
                scale, zero = grids[r, g0]
            q = grid_value(w[r][j], scale, zero, maxq)
            err = (w[r][j] - q) / U[j][j]
            loss += err * err / 2
            Q[r][j] = q
            for k in range(j + 1, C):
                w[r][k] -= err * U[j][k]
    out = torch.zeros(R, C, dtype=torch.float64)
    for pos, c in enumerate(order):
        for r in range(R):
            out[r, c] = Q[r][pos]
    return out, loss

"""Slow loop-form reference of PB-LLM (tests only), written from arXiv 2310.00034 and
hahnyuan/PB-LLM gptq_pb: per column group, the entries with criterion ``w^2/d^2`` (``hessian``)
or ``|w|`` (``magnitude``) at most the ``floor(low_frac * n)``-th smallest are binarized
(``sign(w - m) * a + m``, m and a per row over the group with the kept entries counted as 0);
the rest go to the per-row ``high_bit`` asymmetric min-max grid; GPTQ updates (non-lazy)."""
from __future__ import annotations

import torch

from reference_gptq import grid_value, minmax, upper_inverse_cholesky


def sign(x: float) -> float:
    return (x > 0) - (x < 0)


def pbllm(W: torch.Tensor, H: torch.Tensor, low_frac: float, high_bit: int = 8,
          metric: str = "hessian", groupsize: int = -1, percdamp: float = 0.01):
    """Returns (Q (R, C) float64, binarized mask (R, C) bool, GPTQ loss)."""
    R, C = W.shape
    gs = C if groupsize == -1 else groupsize
    hmax = 2 ** high_bit - 1
    w = [[float(W[r, c]) for c in range(C)] for r in range(R)]
    high = [minmax(w[r], hmax, False) for r in range(R)]
    U = upper_inverse_cholesky(H, percdamp).tolist()
    for c in range(C):
        if float(H[c, c]) == 0:
            for r in range(R):
                w[r][c] = 0.0
    binary = [[False] * C for _ in range(R)]
    stats = {}
    for g0 in range(0, C, gs):
        cols = range(g0, g0 + gs)
        crit = {(r, c): (w[r][c] ** 2 / U[c][c] ** 2 if metric == "hessian" else abs(w[r][c]))
                for r in range(R) for c in cols}
        thresh = sorted(crit.values())[int(len(crit) * low_frac)]
        for (r, c), v in crit.items():
            binary[r][c] = v <= thresh
        for r in range(R):
            vals = [w[r][c] if binary[r][c] else 0.0 for c in cols]
            m = sum(vals) / gs
            stats[r, g0] = m, sum(abs(v - m) for v in vals) / gs
    Q = [[0.0] * C for _ in range(R)]
    loss = 0.0
    for j in range(C):
        for r in range(R):
            if binary[r][j]:
                m, a = stats[r, j // gs * gs]
                q = sign(w[r][j] - m) * a + m
            else:
                q = grid_value(w[r][j], *high[r], hmax)
            err = (w[r][j] - q) / U[j][j]
            loss += err * err / 2
            Q[r][j] = q
            for k in range(j + 1, C):
                w[r][k] -= err * U[j][k]
    return torch.tensor(Q, dtype=torch.float64), torch.tensor(binary), loss

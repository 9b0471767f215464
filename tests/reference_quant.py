"""Slow, loop-based reference of docs/method.md, written for readability (tests only).

Loops over rows, thresholds, columns and k; every statistic is computed directly from its
definition. The fast library (hbllm.quant) must match it.
"""
from __future__ import annotations

import math

import torch

R2 = 1.0 / math.sqrt(2.0)
INV = {"exact": R2, "authors": 0.70703125}


def b1(x: torch.Tensor, mode: str, mean=None) -> torch.Tensor:
    """Binarize a 1-D group: sign(x-m)*a + m, a = mean|x-m| (abs) or RMS (rms)."""
    if x.numel() == 0:
        return x.clone()
    m = x.mean() if mean is None else mean
    if mode == "abs":
        a = (x - m).abs().mean()
    else:
        a = ((x - m) ** 2).mean().sqrt()
    return torch.sign(x - m) * a + m


def b2(x: torch.Tensor) -> torch.Tensor:
    """2nd-order residual binarizer of a 1-D group."""
    first = b1(x, "abs")
    return first + b1(x - first, "abs")


def binarize_split_row(x: torch.Tensor, t: float, mode: str, shared_mean: bool) -> torch.Tensor:
    """Binarize one row: groups |x| < t and |x| >= t."""
    out = torch.zeros_like(x)
    mean = x.mean() if shared_mean else None
    for group in (x.abs() < t, x.abs() >= t):
        out[group] = b1(x[group], mode, mean)
    return out


def split_search(X: torch.Tensor, partition: str, shared_mean: bool, mode: str = "rms") -> torch.Tensor:
    """Section 4: best two-group magnitude split, per row (41 levels) or global (81 levels)."""
    out = torch.zeros_like(X)
    if partition == "row":
        levels = torch.linspace(0.10, 0.90, 41)
        for r in range(X.shape[0]):
            thresholds = torch.quantile(X[r].abs(), levels)
            best = math.inf
            for t in thresholds:
                q = binarize_split_row(X[r], t, mode, shared_mean)
                err = float(((X[r] - q) ** 2).sum())
                if err < best:
                    best, out[r] = err, q
        return out
    levels = torch.linspace(0.10, 0.90, 81)
    thresholds = torch.quantile(X.abs().flatten(), levels)
    best = math.inf
    for t in thresholds:
        q = torch.stack([binarize_split_row(X[r], t, mode, shared_mean) for r in range(X.shape[0])])
        err = float(((X - q) ** 2).sum())
        if err < best:
            best, out = err, q
    return out


def haar(X: torch.Tensor, along: str):
    """along='cols': pairs adjacent columns of each row; 'rows': pairs adjacent rows."""
    Y = X if along == "cols" else X.T
    low = torch.zeros(Y.shape[0], Y.shape[1] // 2)
    high = torch.zeros_like(low)
    for j in range(Y.shape[1] // 2):
        a, b = Y[:, 2 * j], Y[:, 2 * j + 1]
        low[:, j], high[:, j] = (a + b) * R2, (a - b) * R2
    return (low, high) if along == "cols" else (low.T, high.T)


def ihaar(low: torch.Tensor, high: torch.Tensor, along: str, inverse: str) -> torch.Tensor:
    c = INV[inverse]
    L, Hh = (low, high) if along == "cols" else (low.T, high.T)
    Y = torch.zeros(L.shape[0], 2 * L.shape[1])
    for j in range(L.shape[1]):
        Y[:, 2 * j], Y[:, 2 * j + 1] = (L[:, j] + Hh[:, j]) * c, (L[:, j] - Hh[:, j]) * c
    return Y if along == "cols" else Y.T


def haar_binarize(X, along, partition, shared_mean, inverse):
    low, high = haar(X, along)
    return ihaar(split_search(low, partition, shared_mean), split_search(high, partition, shared_mean),
                 along, inverse)


def fill_avg(W: torch.Tensor, salient: list) -> torch.Tensor:
    C = W.shape[1]
    out = W.clone()
    for c in salient:
        window = [j for j in range(max(0, c - 3), min(C, c + 4)) if j not in salient]
        if window:
            out[:, c] = W[:, window].mean(1)
        else:
            left = [j for j in range(c) if j not in salient]
            right = [j for j in range(c + 1, C) if j not in salient]
            out[:, c] = W[:, left[-1] if left else right[0]]
    return out


def select_salient(W: torch.Tensor, d: torch.Tensor, metric: str, up_lim: int) -> list:
    """Section 2: score columns, try k = 1 .. up_lim-1 top columns with B2 on both sides of T."""
    T = W ** 2 / d[None, :] ** 2
    C = W.shape[1]
    scores = []
    for c in range(C):
        if metric == "l2":
            scores.append(float(T[:, c].norm()))
        elif metric == "l1":
            scores.append(float(T[:, c].abs().sum()))
        else:
            scores.append(float(W[:, c].abs().sum()))
    order = sorted(range(C), key=lambda c: -scores[c])[: min(up_lim, C)]
    best, best_k = math.inf, None
    for k in range(1, len(order)):
        sal = set(order[:k])
        sal_cols = [c for c in range(C) if c in sal]
        rest = [c for c in range(C) if c not in sal]
        Q = torch.zeros_like(T)
        for r in range(T.shape[0]):
            Q[r, sal_cols] = b2(T[r, sal_cols])
            Q[r, rest] = b2(T[r, rest])
        err = float(((T - Q) ** 2).mean())
        if err < best:
            best, best_k = err, k
    return sorted(order[:best_k])


def salient_residual(Rm, partition, inverse):
    return haar_binarize(Rm, "rows", partition, False, inverse)


def hbllm_block(W, sal, layout, partition, shared_mean, inverse):
    C = W.shape[1]
    rest = [c for c in range(C) if c not in sal]
    if layout == "row":
        N = haar_binarize(fill_avg(W, sal), "cols", partition, shared_mean, inverse)
    else:
        N = torch.zeros_like(W)
        N[:, rest] = haar_binarize(W[:, rest], "rows", partition, shared_mean, inverse)
    Q = N.clone()
    Q[:, sal] = N[:, sal] + salient_residual(W[:, sal] - N[:, sal], partition, inverse)
    return Q


def billm_block(W, sal):
    C = W.shape[1]
    rest = [c for c in range(C) if c not in sal]
    Q = torch.zeros_like(W)
    for r in range(W.shape[0]):
        Q[r, sal] = b2(W[r, sal])
    Q[:, rest] = split_search(W[:, rest], "global", False, mode="abs")
    return Q


def sign_block(W):
    return torch.stack([b1(W[r], "abs") for r in range(W.shape[0])])


def quantize(W, H, method="hbllm", layout="row", partition="row", shared_mean=False,
             salient_metric="l2", up_lim=50, blocksize=128, percdamp=0.01, inverse="exact",
             disable_gptq=False):
    """Section 1: GPTQ block loop. Returns (Q, loss, salient columns per block)."""
    W = W.clone().float()
    H = H.clone().float()
    for j in range(H.shape[0]):
        if H[j, j] == 0:
            H[j, j] = 1
            W[:, j] = 0
    damp = percdamp * float(torch.diag(H).mean())
    for j in range(H.shape[0]):
        H[j, j] += damp
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    loss = 0.0
    chosen = []
    for s in range(0, W.shape[1], blocksize):
        e = min(s + blocksize, W.shape[1])
        Wb = W[:, s:e].clone()
        d = torch.diag(U)[s:e]
        if method == "sign":
            sal, Q = [], sign_block(Wb)
        else:
            sal = select_salient(Wb, d, salient_metric, up_lim)
            Q = billm_block(Wb, sal) if method == "billm" else hbllm_block(
                Wb, sal, layout, partition, shared_mean, inverse)
        Err = (Wb - Q) / d[None, :]
        loss += float((Err ** 2).sum()) / 2
        W[:, s:e] = Q
        if not disable_gptq:
            W[:, e:] -= Err @ U[s:e, e:]
        chosen.append(sal)
    return W, loss, chosen

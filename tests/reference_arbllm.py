"""Slow, loop-based reference of ARB-LLM (arXiv 2410.03129, docs/arbllm.md), tests only.

Written from the paper's algorithm as the authors' code runs it (ZHITENGLI/ARB-LLM @ 8512765): every
statistic is a loop over rows, columns, entries or thresholds on the masked entries only. The fast
block quantizer (hbllm.quant.arbllm) must match it.
"""
from __future__ import annotations

import math

import torch

import reference_quant as ref

EPS_ARB, EPS_X = 1e-8, 1e-10
LEVELS = torch.linspace(0.10, 0.90, 81)
SIGNS = ((-1, -1), (-1, 1), (1, -1), (1, 1))  # candidate order; ties go to the first


def arb1_row(x, iters):
    """1st-order ARB of one row's group entries x (1-D): (mu, alpha, b)."""
    if x.numel() == 0:
        return 0.0, 0.0, x.clone()
    mu = x.mean()
    alpha = (x - mu).abs().mean()
    b = torch.sign(x - mu)
    for _ in range(iters):
        mu = mu + (x - (alpha * b + mu)).mean()
        alpha = (b * (x - mu)).sum() / ((b * b).sum() + EPS_ARB)
        b = torch.sign(x - mu)
    return mu, alpha, b


def nearest_pair(t, a0, a1):
    """Sign pair (b0, b1) whose a0*b0 + a1*b1 is nearest to t (first of SIGNS on ties)."""
    best, pair = math.inf, None
    for s0, s1 in SIGNS:
        dist = abs(float(t - (s0 * a0 + s1 * a1)))
        if dist < best:
            best, pair = dist, (s0, s1)
    return pair


def arb2_row(x, iters):
    """2nd-order ARB of one row's group entries: (mu, [a0, a1], [b0, b1])."""
    if x.numel() == 0:
        return 0.0, [0.0, 0.0], [x.clone(), x.clone()]
    approx = torch.zeros_like(x)
    mu, alphas, planes = 0.0, [], []
    for _ in range(2):
        res = x - approx
        mean = res.mean()
        a = (res - mean).abs().mean()
        b = torch.sign(res - mean)
        approx = approx + a * b + mean
        mu, alphas, planes = mu + mean, alphas + [a], planes + [b]
    (a0, a1), (b0, b1) = alphas, planes
    for _ in range(iters):
        mu = mu + (x - (a0 * b0 + a1 * b1 + mu)).mean()
        t = x - mu
        a0 = (b0 * (t - a1 * b1)).sum() / ((b0 * b0).sum() + EPS_ARB)
        a1 = (b1 * (t - a0 * b0)).sum() / ((b1 * b1).sum() + EPS_ARB)
        b0, b1 = torch.zeros_like(x), torch.zeros_like(x)
        for j in range(x.numel()):
            b0[j], b1[j] = nearest_pair(t[j], a0, a1)
    return mu, [a0, a1], [b0, b1]


def xdot(u, S, v):
    """u^T S v."""
    return float(u @ S @ v)


def refine_x_row(x, S, mu, alphas, planes, iters):
    """ARB-X on one row's group entries x with S restricted to their columns: signs fixed, mu and
    each alpha minimize (x - q)^T S (x - q) in turn."""
    if x.numel() == 0:
        return mu, alphas
    ones = torch.ones_like(x)
    alphas = list(alphas)
    for _ in range(iters):
        e = x - sum(a * b for a, b in zip(alphas, planes))
        mu = xdot(e, S, ones) / (xdot(ones, S, ones) + EPS_X)
        for p, b in enumerate(planes):
            rest = x - mu - sum(alphas[q] * planes[q] for q in range(len(planes)) if q != p)
            alphas[p] = xdot(b, S, rest) / (xdot(b, S, b) + EPS_X)
    return mu, alphas


def rc_start(x, mask):
    """Row scale mean|x|, column scale mean|x / row| over rows with a nonzero row scale, signs."""
    R, n = x.shape
    ar = torch.zeros(R, dtype=x.dtype)
    ac = torch.zeros(n, dtype=x.dtype)
    for i in range(R):
        vals = [abs(float(x[i, j])) for j in range(n) if mask[i, j]]
        ar[i] = sum(vals) / len(vals) if vals else 0.0
    for j in range(n):
        vals = [abs(float(x[i, j] / ar[i])) for i in range(R) if mask[i, j] and ar[i] > 0]
        ac[j] = sum(vals) / len(vals) if vals else 0.0
    return ar, ac, torch.sign(x) * mask


def rc_scales(target, ar, ac, b, mask):
    R, n = target.shape
    for i in range(R):
        num = sum(float(ac[j] * b[i, j] * target[i, j]) for j in range(n) if mask[i, j])
        den = sum(float(ac[j] * b[i, j]) ** 2 for j in range(n) if mask[i, j])
        ar[i] = num / (den + EPS_ARB)
    for j in range(n):
        num = sum(float(ar[i] * b[i, j] * target[i, j]) for i in range(R) if mask[i, j])
        den = sum(float(ar[i] * b[i, j]) ** 2 for i in range(R) if mask[i, j])
        ac[j] = num / (den + EPS_ARB)
    return ar, ac


def rc1(x, mask, iters):
    """1st-order ARB-RC of the masked entries of x (R, n): q = ar_i ac_j sign(x_ij)."""
    x = x * mask
    ar, ac, b = rc_start(x, mask)
    for _ in range(iters):
        ar, ac = rc_scales(x, ar, ac, b, mask)
    return torch.outer(ar, ac) * b


def rc2(x, mask, iters):
    """2nd-order ARB-RC of the masked entries of x (R, n)."""
    x = x * mask
    ar0, ac0, b0 = rc_start(x, mask)
    ar1, ac1, b1 = rc_start(x - torch.outer(ar0, ac0) * b0, mask)
    R, n = x.shape
    for _ in range(iters):
        ar0, ac0 = rc_scales(x - torch.outer(ar1, ac1) * b1, ar0, ac0, b0, mask)
        ar1, ac1 = rc_scales(x - torch.outer(ar0, ac0) * b0, ar1, ac1, b1, mask)
        b0, b1 = torch.zeros_like(x), torch.zeros_like(x)
        for i in range(R):
            for j in range(n):
                if mask[i, j]:
                    b0[i, j], b1[i, j] = nearest_pair(x[i, j], ar0[i] * ac0[j], ar1[i] * ac1[j])
    return torch.outer(ar0, ac0) * b0 + torch.outer(ar1, ac1) * b1


def group_rows(x, mask, fn):
    """Apply a row-wise binarizer fn(entries) -> values to the masked entries of each row."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        idx = mask[i].nonzero().flatten()
        if idx.numel():
            out[i, idx] = fn(x[i, idx])
    return out


def salient_split(ts):
    """CGB split of the salient entries of T: upper-group mask (|t| >= best threshold)."""
    a = ts.abs()
    nonzero = a[a != 0]
    if nonzero.numel() == 0:
        return torch.zeros_like(a, dtype=torch.bool)
    best, best_t = math.inf, None
    for t in torch.quantile(nonzero, LEVELS.to(ts.dtype)):
        q = group_rows(ts, a < t, ref.b2) + group_rows(ts, a >= t, ref.b2)
        err = float(((ts - q) ** 2).sum())
        if err < best:
            best, best_t = err, t
    return a >= best_t


def plain_split(T, sal, S, iters):
    """Split of the non-salient entries of T: upper-group mask over the plain columns."""
    R, C = T.shape
    plain = [c for c in range(C) if c not in sal]
    flat = (T * torch.tensor([c not in sal for c in range(C)], dtype=T.dtype)).abs().flatten()
    g3 = torch.zeros_like(T)
    if S is not None:
        for i in range(R):
            mu, al, pl = arb2_row(T[i, sal], iters)
            g3[i, sal] = mu + al[0] * pl[0] + al[1] * pl[1]
    tn = T[:, plain]
    best, best_t = math.inf, None
    for t in torch.quantile(flat, LEVELS.to(T.dtype)):
        qn = group_rows(tn, tn.abs() < t, lambda v: ref.b1(v, "abs")) + \
            group_rows(tn, tn.abs() >= t, lambda v: ref.b1(v, "abs"))
        E = T - g3
        E[:, plain] = tn - qn
        if S is None:
            err = float((E ** 2).sum())
        else:
            err = sum(xdot(E[i], S, E[i]) for i in range(R))
        if err < best:
            best, best_t = err, t
    return tn.abs() >= best_t


def arb_block(W, d, variant, S=None, up_lim=50, iters=15, x_iters=15, cgb=True, split_on="t"):
    """One block: (Q, salient columns). The splits search T = W^2/d^2 (split_on "t") or W."""
    R, C = W.shape
    sal = ref.select_salient(W, d, "l1", up_lim)
    plain = [c for c in range(C) if c not in sal]
    T = W ** 2 / d[None, :] ** 2 if split_on == "t" else W
    sal_groups = [torch.ones(R, len(sal), dtype=torch.bool)]
    if cgb:
        up = salient_split(T[:, sal])
        sal_groups = [~up, up]
    up = plain_split(T, sal, S if variant == "x" else None, iters)
    plain_groups = [~up, up]
    Q = torch.zeros_like(W)
    ws, wn = W[:, sal], W[:, plain]
    for cols, x, groups, order in ((sal, ws, sal_groups, 2), (plain, wn, plain_groups, 1)):
        q = torch.zeros_like(x)
        for g in groups:
            if variant == "rc":
                q += (rc2 if order == 2 else rc1)(x, g.to(x.dtype), iters) * g
                continue
            for i in range(R):
                idx = g[i].nonzero().flatten()
                if idx.numel() == 0:
                    continue
                xi = x[i, idx]
                if order == 2:
                    mu, alphas, planes = arb2_row(xi, iters)
                else:
                    mu, a, b = arb1_row(xi, iters)
                    alphas, planes = [a], [b]
                cols_i = [cols[j] for j in idx.tolist()]
                mu, alphas = refine_x_row(xi, S[cols_i][:, cols_i], mu, alphas, planes, x_iters)
                q[i, idx] = mu + sum(a * b for a, b in zip(alphas, planes))
        Q[:, cols] = q
    return Q, sal

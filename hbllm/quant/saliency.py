"""Salient column selection per GPTQ block (docs/method.md section 2).

Target ``T = W^2 / d^2`` (d = diag of the upper Cholesky factor of H^-1, per column). Columns are
ranked by a score (``l2``/``l1`` norm of T's columns, or ``magnitude``: L1 norm of W's columns);
among the top ``up_lim`` the number k (1 .. up_lim-1) minimizing the error of binarizing T with B2
on the salient set and on its complement is kept. All k are evaluated at once (chunked).
"""
from __future__ import annotations

import torch


def column_scores(w: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor:
    """Saliency score per column ``(C,)`` of a block ``w`` ``(R, C)`` with target ``T``."""
    if metric == "l2":
        return torch.linalg.vector_norm(target, 2, dim=0)
    if metric == "l1":
        return target.abs().sum(0)
    if metric == "magnitude":
        return w.abs().sum(0)
    raise ValueError(f"salient_metric={metric!r} is not one of ['l2', 'l1', 'magnitude']")


def _prefix(v: torch.Tensor) -> torch.Tensor:
    return torch.cat((v.new_zeros(*v.shape[:-1], 1), v.cumsum(-1)), -1)


class _FixedPart:
    """Columns that are non-salient for every k: each row sorted, float64 prefix sums of x and x^2.
    Answers sums over value ranges for per-row query values ``(R, K)``."""

    def __init__(self, x: torch.Tensor):
        self.v = x.double().sort(-1).values
        self.p1, self.p2 = _prefix(self.v), _prefix(self.v * self.v)
        self.n = x.shape[-1]

    def rank(self, c: torch.Tensor, right: bool = False) -> torch.Tensor:
        if self.n == 0:
            return torch.zeros_like(c, dtype=torch.long)
        return torch.searchsorted(self.v, c.contiguous(), right=right)

    def abs_range(self, lo, hi, c):
        """``sum |x - c|`` over sorted positions ``[lo, hi)``."""
        p = torch.minimum(torch.maximum(self.rank(c), lo), hi)
        s = self.p1.gather
        return c * (p - lo) - (s(-1, p) - s(-1, lo)) + (s(-1, hi) - s(-1, p)) - c * (hi - p)

    def sq_range(self, lo, hi, c):
        """``sum (x - c)^2`` over sorted positions ``[lo, hi)``."""
        s1 = self.p1.gather(-1, hi) - self.p1.gather(-1, lo)
        s2 = self.p2.gather(-1, hi) - self.p2.gather(-1, lo)
        return s2 - 2 * c * s1 + c * c * (hi - lo)


def chunk_elems(device: torch.device) -> int:
    """Elements per temporary: small on CPU (stays in the allocator's reused heap, avoiding
    page faults), large on GPU."""
    return 1 << 28 if device.type == "cuda" else 1 << 21


def k_errors(target: torch.Tensor, ks: torch.Tensor, u: int) -> torch.Tensor:
    """Squared error ``(len(ks),)`` (float64) of B2 on the first k columns of ``target`` ``(R, C)``
    and B2 on the others, for each k in ``ks`` (all < u), in chunks of k."""
    fixed = _FixedPart(target[:, u:])
    cand = target[:, :u].T.contiguous()
    step = min(len(ks), max(1, chunk_elems(target.device) // cand.numel()))
    bufs = torch.empty(3, step, *cand.shape, dtype=cand.dtype, device=cand.device)
    return torch.cat([_k_errors(cand, fixed, k, target.shape[1], bufs[:, :len(k)]) for k in ks.split(step)])


def _k_errors(xt: torch.Tensor, fixed: _FixedPart, ks: torch.Tensor, C: int,
              bufs: torch.Tensor) -> torch.Tensor:
    """:func:`k_errors` for the candidate columns ``xt`` ``(u, R)`` (transposed) and the rest;
    ``bufs`` ``(3, K, u, R)`` is scratch space.

    Candidates are handled directly as ``(K, u, R)`` tensors (updated in place), the two groups'
    per-row sums and broadcasts being batched matmuls with the 0/1 group matrix ``(K, 2, u)``;
    the never-salient rest through sorted float64 prefix sums. Group errors use
    ``sum (e - sign(e) b)^2 = sum e^2 - n b^2`` (exact unless some ``e`` is exactly 0)."""
    u, R = xt.shape
    K = len(ks)
    nf = fixed.n
    sal = (torch.arange(u, device=xt.device) < ks[:, None]).to(xt.dtype)  # (K, u)
    groups = torch.stack((sal, 1 - sal), 1)  # (K, 2, u): salient, non-salient candidate
    spread = groups.transpose(1, 2).contiguous()  # (K, u, 2)
    n_s = ks.view(-1, 1, 1).to(torch.float64)
    n = torch.cat((n_s, C - n_s), 1)  # (K, 2, 1)
    zero = torch.zeros(R, K, dtype=torch.long, device=xt.device)
    full = torch.full_like(zero, nf)
    buf, d, sgn = bufs

    def sums(v, fixed_part):  # per-group row sums (K, 2, R), fixed part (R, K) added to group 1
        out = torch.matmul(groups, v).double()
        out[:, 1, :] += fixed_part.T
        return out

    def spread_(v):  # (K, 2, R) group values -> (K, u, R) in buf
        return torch.bmm(spread, v.to(xt.dtype), out=buf)

    # first order: group means m, scales a = mean |x - m|
    m = sums(xt, fixed.p1[:, -1:].expand(R, K)) / n
    torch.sub(xt, spread_(m), out=d)  # x - m of its group
    torch.sign(d, out=sgn)
    qm = m[:, 1, :].T
    a = sums(torch.abs(d, out=buf), fixed.abs_range(zero, full, qm)) / n
    # second order on r = d - sign(d) a: mean m2 = (sum d - a * sum sign(d)) / n, with sum d = 0
    lt, le = fixed.rank(qm), fixed.rank(qm, right=True)  # rest entries < m, <= m
    qa = a[:, 1, :].T
    m2 = -a * sums(sgn, ((nf - le) - lt).double()) / n
    e = d.addcmul_(sgn, spread_(a), value=-1).sub_(spread_(m2))
    qm2 = m2[:, 1, :].T
    up, down = qm + qa + qm2, qm - qa + qm2  # r - m2 = x - up (x > m), x - down (x < m)
    abs_fixed = (fixed.abs_range(le, full, up) + fixed.abs_range(zero, lt, down)
                 + (le - lt) * qm2.abs())
    sq_fixed = fixed.sq_range(le, full, up) + fixed.sq_range(zero, lt, down) + (le - lt) * qm2 * qm2
    b = sums(torch.abs(e, out=buf), abs_fixed) / n
    sq = torch.linalg.vector_norm(e.view(K, -1), dim=1).double().square()
    return sq + sq_fixed.sum(0) - (n * b * b).sum((1, 2))


def select_salient(w: torch.Tensor, d: torch.Tensor, metric: str = "l2", up_lim: int = 50) -> torch.Tensor:
    """Salient columns of a block ``w`` ``(R, C)`` given ``d`` ``(C,)``: sorted LongTensor ``(k,)``."""
    target = w.square() / d.square()[None, :]
    score = column_scores(w, target, metric)
    C = w.shape[1]
    u = min(up_lim, C)
    cand = torch.topk(score, u).indices
    rest = torch.ones(C, dtype=torch.bool, device=w.device)
    rest[cand] = False
    perm = torch.cat((cand, rest.nonzero().flatten()))
    ks = torch.arange(1, u, device=w.device)
    k = int(k_errors(target[:, perm], ks, u).argmin()) + 1
    return cand[:k].sort().values

"""GPTQ (arXiv 2210.17323) as IST-DASLab/gptq defines it: inside each block of ``blocksize``
columns, column by column, each column rounded to its group's min-max grid and its error
compensated on the block's later columns; the block's errors are applied to all later columns at
once (lazy batch update). Options: ``groupsize`` (-1: one grid per row), ``sym``, ``act_order``
(columns in decreasing ``diag(H)`` order), ``static_groups`` (grids fixed from the unquantized
weight before the loop)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .block_loop import upper_inverse_cholesky
from .registry import LoopOutput, at_defaults
from .uniform import UniformCodes, group_params, minmax_params, to_grid


@dataclass
class ColumnGrids:
    """Per-entry rounding rule of a block ``(R, b)``: the grid ``scale * (code - zero)`` with codes
    in ``[0, maxq]``; where ``binary`` (bool, optional) is set, ``sign(w - mean) * alpha + mean``
    instead (code: the sign). Tensors ``(R, b)``, broadcast views allowed."""

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int
    binary: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    alpha: torch.Tensor | None = None

    def round(self, w: torch.Tensor, i: int):
        """``(q, code)`` ``(R,)`` of column ``i`` holding ``w``."""
        s, z = self.scale[:, i], self.zero[:, i]
        code = to_grid(w, s, z, self.maxq)
        q = s * (code - z)
        if self.binary is None:
            return q, code
        b, m = self.binary[:, i], self.mean[:, i]
        sign = (w - m).sign()
        return torch.where(b, sign * self.alpha[:, i] + m, q), torch.where(b, sign, code)


BACKEND = "auto"  # column_loop's default backend (tests set it)
KERNEL_MAX_BLOCK = 256  # widest block the kernel holds in registers; wider ones use the tensor loop


def column_loop(W: torch.Tensor, U: torch.Tensor, blocksize: int, grids, backend: str | None = None):
    """The GPTQ column loop over ``W`` ``(R, C)`` (modified in place) with ``U`` the upper
    Cholesky factor of ``H^-1``. ``grids(i1, i2)`` is called at each block start (``W`` then
    holds the block-start state) and returns the block's :class:`ColumnGrids`. ``backend``:
    ``torch`` (tensor operations per column), ``triton`` (one kernel per block,
    :mod:`hbllm.quant.column_kernel`; the same result bit for bit) or ``auto`` (triton on CUDA
    when it is installed and ``blocksize <= KERNEL_MAX_BLOCK``); default :data:`BACKEND`.
    Returns the quantized weight, the codes ``(R, C)`` and the GPTQ loss per row."""
    R, C = W.shape
    backend = backend or BACKEND
    if backend == "auto":
        backend = "triton" if W.is_cuda and blocksize <= KERNEL_MAX_BLOCK and _has_triton() else "torch"
    if backend == "triton":
        from .column_kernel import block_columns
    Q = torch.empty_like(W)
    codes = torch.empty_like(W)
    row_loss = torch.zeros(R, device=W.device)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        g = grids(i1, i2)
        U1 = U[i1:i2, i1:i2]
        if backend == "triton":
            Q[:, i1:i2], codes[:, i1:i2], err = block_columns(W[:, i1:i2], U1, g)
        else:
            W1 = W[:, i1:i2].clone()
            err = torch.empty_like(W1)
            for i in range(i2 - i1):
                w = W1[:, i]
                q, code = g.round(w, i)
                Q[:, i1 + i], codes[:, i1 + i] = q, code
                e = (w - q) / U1[i, i]
                W1[:, i:] -= torch.outer(e, U1[i, i:])
                err[:, i] = e
        row_loss += err.square().sum(1) / 2
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return Q, codes, row_loss


@cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gptq_loop(W: torch.Tensor, H: torch.Tensor, cfg) -> LoopOutput:
    """Quantize ``W`` ``(R, C)`` (float32, modified) with Hessian ``H`` ``(C, C)`` (modified)."""
    R, C = W.shape
    maxq = 2 ** cfg.wbits - 1
    gs = cfg.groupsize
    if gs == -1:  # one grid per row, from the weight as given (before dead inputs are zeroed)
        row_scale, row_zero = minmax_params(W, maxq, cfg.sym)
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0
    if gs != -1 and cfg.static_groups:
        static = group_params(W, gs, maxq, cfg.sym)
    perm = torch.arange(C, device=W.device)
    if cfg.act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = upper_inverse_cholesky(H, cfg.percdamp)[0]
    scales, zeros = [], []  # dynamic groups, in the order they start

    def grids(i1: int, i2: int) -> ColumnGrids:
        """The block's grids: per-column (scale, zero) ``(R, i2 - i1)``."""
        if gs == -1:
            return ColumnGrids(row_scale.expand(R, i2 - i1), row_zero.expand(R, i2 - i1), maxq)
        if cfg.static_groups:
            g = perm[i1:i2] // gs
            return ColumnGrids(static[0][:, g], static[1][:, g], maxq)
        first = -(-i1 // gs) * gs  # groups starting in this block, from the block-start weight
        if first < i2:
            last = (i2 - 1) // gs * gs
            s, z = group_params(W[:, first:min(last + gs, C)], gs, maxq, cfg.sym)
            scales.append(s)
            zeros.append(z)
        g = torch.arange(i1, i2, device=W.device) // gs
        return ColumnGrids(torch.cat(scales, 1)[:, g], torch.cat(zeros, 1)[:, g], maxq)

    Q, q, row_loss = column_loop(W, U, cfg.blocksize, grids)
    inv = torch.argsort(perm)
    Q, q = Q[:, inv], q[:, inv]
    if gs == -1:
        scale, zero, group = row_scale, row_zero, torch.zeros(C, dtype=torch.long, device=W.device)
    elif cfg.static_groups:
        (scale, zero), group = static, torch.arange(C, device=W.device) // gs
    else:
        scale, zero, group = torch.cat(scales, 1), torch.cat(zeros, 1), inv // gs
    explicit = cfg.act_order and gs != -1 and not cfg.static_groups
    return LoopOutput(Q, row_loss, [UniformCodes(q.to(torch.uint8), scale, zero, group, cfg.wbits,
                                                 cfg.sym, explicit)])


def check_gptq(cfg) -> None:
    if not isinstance(cfg.wbits, int) or not 2 <= cfg.wbits <= 8:
        raise ValueError(f"quant.wbits={cfg.wbits!r} must be an integer in [2, 8] for gptq")
    if cfg.groupsize != -1 and (not isinstance(cfg.groupsize, int) or cfg.groupsize < 1):
        raise ValueError(f"quant.groupsize={cfg.groupsize!r} must be -1 (per row) or a positive integer")
    if cfg.static_groups and cfg.groupsize == -1:
        raise ValueError("quant.static_groups=true needs quant.groupsize > 0 (groups to fix)")


def gptq_label(cfg) -> str:
    if at_defaults(cfg):
        return "gptq"
    return (f"gptq_w{cfg.wbits}" + (f"g{cfg.groupsize}" if cfg.groupsize != -1 else "")
            + ("_sym" if cfg.sym else "") + ("_act" if cfg.act_order else "")
            + ("_static" if cfg.static_groups else ""))

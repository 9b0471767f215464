"""Round-to-nearest baseline (the GPTQ repository's ``--nearest``): every weight to the nearest
point of its (row, column group)'s asymmetric min-max grid, no Hessian compensation."""
from __future__ import annotations

import torch

from .block_loop import inverse_cholesky_diagonal
from .registry import LoopOutput, at_defaults
from .uniform import UniformCodes, group_params, to_grid

WBITS = (2, 3, 4, 8)


def rtn_loop(W: torch.Tensor, H: torch.Tensor, cfg) -> LoopOutput:
    """Quantize ``W`` ``(R, C)``; ``H`` only gives the reported GPTQ loss ``sum((W-Q)^2/d^2)/2``."""
    R, C = W.shape
    gs = C if cfg.groupsize == -1 else cfg.groupsize
    maxq = 2 ** cfg.wbits - 1
    scale, zero = group_params(W, gs, maxq, sym=False)
    group = torch.arange(C, device=W.device) // gs
    q = to_grid(W, scale[:, group], zero[:, group], maxq)
    Q = scale[:, group] * (q - zero[:, group])
    d = inverse_cholesky_diagonal(H, cfg.percdamp)
    row_loss = ((W - Q) / d).square().sum(1) / 2
    return LoopOutput(Q, row_loss, [UniformCodes(q.to(torch.uint8), scale, zero, group, cfg.wbits, False)])


def check_rtn(cfg) -> None:
    if cfg.wbits not in WBITS:
        raise ValueError(f"quant.wbits={cfg.wbits!r} is not one of {list(WBITS)} for rtn")
    if cfg.groupsize != -1 and (not isinstance(cfg.groupsize, int) or cfg.groupsize < 1):
        raise ValueError(f"quant.groupsize={cfg.groupsize!r} must be -1 (per row) or a positive integer")


def rtn_label(cfg) -> str:
    if at_defaults(cfg):
        return "rtn"
    return f"rtn_w{cfg.wbits}" + (f"g{cfg.groupsize}" if cfg.groupsize != -1 else "")

"""Rebuild a quantized block from its codes (what a packed checkpoint stores)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..config import QuantConfig
from .haar import haar_inverse


def _bands(codes, dim: int, inverse: str) -> torch.Tensor:
    q = codes.dequantize()
    return haar_inverse(q[0], q[1], dim, inverse)


def dequantize_block(codes: Dict[str, Any], cfg: QuantConfig, rows: int) -> torch.Tensor:
    """Dequantized block ``(rows, end - start)`` from one entry of ``QuantResult.codes``."""
    cols = codes["end"] - codes["start"]
    sal = codes["salient_idx"]
    if cfg.method == "sign":
        b = codes["main"]
        return b.sign * b.scale + b.mean
    main = codes["main"]
    out = torch.zeros(rows, cols, dtype=main.scale.dtype, device=main.scale.device)
    plain = torch.ones(cols, dtype=torch.bool, device=out.device)
    plain[sal] = False
    if cfg.method == "billm":
        first, second = codes["salient"]
        out[:, sal] = first.sign * first.scale + first.mean + second.sign * second.scale + second.mean
        out[:, plain] = main.dequantize()[0]
        return out
    if cfg.layout == "row":
        out = _bands(main, 1, cfg.haar_inverse)
    else:
        out[:, plain] = _bands(main, 0, cfg.haar_inverse)
    out[:, sal] += _bands(codes["residual"], 0, cfg.haar_inverse)
    return out

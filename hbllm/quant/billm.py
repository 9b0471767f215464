"""BiLLM (arXiv 2402.04291, "braq") block quantizer (docs/method.md section 6): B2 on the salient
columns; the other entries split once by one magnitude threshold (81 quantiles of their |W|),
each group B1_abs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .binarize import Binarized, binarize2
from .bits import FP_BITS, binarized_bits, index_bits, split_bits
from .saliency import select_salient
from .split_search import SplitCodes, split_binarize

SALIENT_METRICS = ("l2", "l1", "magnitude")


@dataclass
class BiLLMCodes:
    """One block: ``salient`` (k,) column indices; ``main`` SplitCodes ``(1, R, C-k)`` of the
    non-salient columns in order; ``first``, ``second`` the two B1 stages of the salient columns
    ``(R, k)``; ``blocksize`` (for the index bits)."""

    salient: torch.Tensor
    main: SplitCodes
    first: Binarized
    second: Binarized
    blocksize: int

    def dequantize(self) -> torch.Tensor:
        plain = self.main.dequantize()[0]
        rows, cols = plain.shape[0], plain.shape[1] + self.salient.numel()
        out = plain.new_zeros(rows, cols)
        keep = torch.ones(cols, dtype=torch.bool, device=out.device)
        keep[self.salient] = False
        f, s = self.first, self.second
        out[:, self.salient] = f.sign * f.scale + f.mean + s.sign * s.scale + s.mean
        out[:, keep] = plain
        return out

    def stored_bits(self) -> int:
        return (split_bits(self.main) + binarized_bits(self.first) + binarized_bits(self.second)
                + self.salient.numel() * index_bits(self.blocksize))


def billm_block(w: torch.Tensor, d: torch.Tensor, cfg):
    """Quantize a block ``w`` ``(R, C)`` (``d`` = diag(U) of its columns). Returns ``(q, codes)``."""
    sal = select_salient(w, d, cfg.salient_metric, cfg.up_lim)
    plain = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    plain[sal] = False
    q = torch.empty_like(w)
    ws = w[:, sal]
    first, second = binarize2(ws, torch.ones_like(ws, dtype=torch.bool))
    q[:, sal] = first.q + second.q
    q[:, plain], main = split_binarize(w[:, plain], "global", False, "abs")
    return q, BiLLMCodes(sal, main, first, second, cfg.blocksize)


def billm_bits(cfg, codes: BiLLMCodes) -> tuple[int, int]:
    """``(paper, full)`` of one block: paper 1 bit per non-salient and 2 per salient weight; full
    adds the membership bits, fp16 statistics (4 per row of each part) and salient indices."""
    R, plain = codes.main.sign.shape[1:]
    k = codes.salient.numel()
    salient = 2 * R * k + R * 4 * FP_BITS + k * index_bits(cfg.blocksize)
    return R * plain + 2 * R * k, 2 * R * plain + R * 4 * FP_BITS + salient


def check_billm(cfg) -> None:
    if cfg.salient_metric not in SALIENT_METRICS:
        raise ValueError(f"quant.salient_metric={cfg.salient_metric!r} is not one of {list(SALIENT_METRICS)}")
    if not isinstance(cfg.up_lim, int) or cfg.up_lim < 2:
        raise ValueError(f"quant.up_lim={cfg.up_lim!r} must be an integer >= 2")

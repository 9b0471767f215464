"""PB-LLM (arXiv 2310.00034) as hahnyuan/PB-LLM's GPTQ variant (gptq_pb/) defines it: a fraction
``1 - low_frac`` of the weights, those with the largest Hessian criterion ``w^2 / d^2`` (or
``|w|``, ``salient_metric=magnitude``) in each column group, stays on a ``high_bit`` asymmetric
per-row min-max grid; the rest is binarized (xnor: ``sign(w - m) * a + m`` with per-row, per-group
``m`` and ``a`` fixed before the loop); the GPTQ column loop compensates every column's error."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bits import FP_BITS
from .block_loop import upper_inverse_cholesky
from .gptq import ColumnGrids, column_loop
from .registry import LoopOutput, at_defaults
from .uniform import minmax_params

SALIENT_METRICS = ("hessian", "magnitude")


@dataclass
class PBLLMCodes:
    """A weight ``(R, C)``: ``binary`` bool ``(R, C)`` (True: binarized), ``sign`` int8 in
    {-1, 0, 1} on it; ``mean``, ``scale`` ``(R, G)`` per column group; ``high`` uint8 ``(R, C)``
    grid codes of the other weights, on per-row ``high_scale``, ``high_zero`` ``(R, 1)``;
    ``high_bit``; ``group`` ``(C,)`` the group of each column (``column // groupsize``)."""

    binary: torch.Tensor
    sign: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    high: torch.Tensor
    high_scale: torch.Tensor
    high_zero: torch.Tensor
    high_bit: int
    group: torch.Tensor

    @property
    def salient(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long, device=self.sign.device)

    def dequantize(self) -> torch.Tensor:
        low = self.sign.float() * self.scale[:, self.group] + self.mean[:, self.group]
        high = self.high_scale * (self.high.float() - self.high_zero)
        return torch.where(self.binary, low, high)

    def stored_bits(self) -> int:
        n_bin = int(self.binary.sum())
        return (self.binary.numel() + n_bin + (self.high.numel() - n_bin) * self.high_bit
                + FP_BITS * (self.mean.numel() + self.scale.numel() + self.high_scale.numel())
                + self.high_bit * self.high_zero.numel())


def binary_mask(W: torch.Tensor, d: torch.Tensor, gs: int, low_frac: float, metric: str) -> torch.Tensor:
    """Bool ``(R, C)``: in each group of ``gs`` columns, the entries whose criterion is at most
    the ``floor(low_frac * n)``-th smallest (0-based) of the group's ``n`` entries."""
    R, C = W.shape
    crit = W.square() / d.square() if metric == "hessian" else W.abs()
    groups = crit.reshape(R, C // gs, gs).transpose(0, 1).reshape(C // gs, R * gs)
    k = int(groups.shape[1] * low_frac)
    thresh = groups.kthvalue(k + 1, dim=1).values  # (G,)
    return crit <= thresh.repeat_interleave(gs)[None, :]


def pbllm_loop(W: torch.Tensor, H: torch.Tensor, cfg) -> LoopOutput:
    """Quantize ``W`` ``(R, C)`` (float32, modified) with Hessian ``H`` ``(C, C)``."""
    R, C = W.shape
    gs = C if cfg.groupsize == -1 else cfg.groupsize
    hmax = 2 ** cfg.high_bit - 1
    high_scale, high_zero = minmax_params(W, hmax, sym=False)  # before dead inputs are zeroed
    U, dead = upper_inverse_cholesky(H, cfg.percdamp)
    W[:, dead] = 0
    binary = binary_mask(W, U.diagonal(), gs, cfg.low_frac, cfg.salient_metric)
    low = (W * binary).reshape(R, C // gs, gs)  # xnor statistics over the whole group, zeros included
    mean = low.mean(-1, keepdim=True)
    scale = (low - mean).abs().mean(-1)
    mean = mean[..., 0]
    group = torch.arange(C, device=W.device) // gs

    def grids(i1: int, i2: int) -> ColumnGrids:
        g = group[i1:i2]
        return ColumnGrids(high_scale.expand(R, i2 - i1), high_zero.expand(R, i2 - i1), hmax,
                           binary[:, i1:i2], mean[:, g], scale[:, g])

    Q, code, row_loss = column_loop(W, U, cfg.blocksize, grids)
    codes = PBLLMCodes(binary, torch.where(binary, code, 0).to(torch.int8), mean, scale,
                       torch.where(binary, 0, code).to(torch.uint8), high_scale, high_zero,
                       cfg.high_bit, group)
    return LoopOutput(Q, row_loss, [codes])


def pbllm_bits(cfg, codes: PBLLMCodes) -> tuple[int, int]:
    """``(paper, full)``: paper 1 bit per binarized and ``high_bit`` per kept weight; full adds a
    1-bit binarized/kept map per weight, fp16 mean and scale per (row, group), an fp16 scale and
    a ``high_bit`` zero point per row."""
    R, C = codes.binary.shape
    n_bin = int(codes.binary.sum())
    paper = n_bin + (R * C - n_bin) * cfg.high_bit
    G = codes.mean.shape[1]
    return paper, paper + R * C + R * G * 2 * FP_BITS + R * (FP_BITS + cfg.high_bit)


def check_pbllm(cfg) -> None:
    if not 0.0 < float(cfg.low_frac) < 1.0:
        raise ValueError(f"quant.low_frac={cfg.low_frac!r} (the binarized fraction) must be in (0, 1)")
    if not isinstance(cfg.high_bit, int) or not 2 <= cfg.high_bit <= 8:
        raise ValueError(f"quant.high_bit={cfg.high_bit!r} must be an integer in [2, 8]")
    if cfg.salient_metric not in SALIENT_METRICS:
        raise ValueError(f"quant.salient_metric={cfg.salient_metric!r} is not one of {list(SALIENT_METRICS)} for pbllm")
    if cfg.groupsize != -1 and (not isinstance(cfg.groupsize, int) or cfg.groupsize < 1
                                or cfg.groupsize % cfg.blocksize):
        raise ValueError(f"quant.groupsize={cfg.groupsize!r} must be -1 or a multiple of "
                         f"quant.blocksize={cfg.blocksize} for pbllm (as the authors assert)")


def check_pbllm_shape(rows: int, cols: int, cfg) -> None:
    if cfg.groupsize != -1 and cols % cfg.groupsize:
        raise ValueError(f"pbllm groupsize={cfg.groupsize} must divide cols={cols}")


def pbllm_label(cfg) -> str:
    if at_defaults(cfg):
        return "pbllm"
    return (f"pbllm_lf{round(100 * cfg.low_frac)}" + (f"_h{cfg.high_bit}" if cfg.high_bit != 8 else "")
            + (f"g{cfg.groupsize}" if cfg.groupsize != -1 else "")
            + ("_mag" if cfg.salient_metric == "magnitude" else ""))

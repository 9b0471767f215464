"""GPTQ-style block loop shared by HBLLM, BiLLM and sign (METHOD.md section 1): each block of
columns is quantized at once, its error ``(W - Q)/d`` compensated on the later columns only."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from ..config import QuantConfig
from .billm import billm_block
from .bits import block_bits
from .layouts import col_layout, row_layout
from .saliency import select_salient
from .sign import sign_block

FP_BASELINE_BITS = 16.0


@dataclass
class QuantResult:
    """Result of :func:`quantize_weight`.

    weight: dequantized weight (same shape, dtype, device as the input); loss: GPTQ loss
    ``sum((W-Q)^2/d^2)/2``; row_loss: its per-row terms ``(rows,)``; bits: ``{"paper", "full"}``
    bits per weight; numel: number of weights; salient: per block, the salient column indices
    (relative to the block start); block_bits: per block ``(paper, full)`` bits; time_s: seconds;
    codes: per block, what a packed checkpoint stores (only with ``return_codes=True``).
    """

    weight: torch.Tensor
    loss: float
    bits: Dict[str, float]
    numel: int
    row_loss: Optional[torch.Tensor] = None
    salient: List[torch.Tensor] = field(default_factory=list)
    block_bits: List[tuple] = field(default_factory=list)
    time_s: float = 0.0
    codes: Optional[List[Dict[str, Any]]] = None


def upper_inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (``diag(H) == 0``) get ``H[j,j] = 1``; damp by ``percdamp * mean(diag H)``;
    return ``(U, dead)`` with U the upper Cholesky factor of ``H^-1`` ``(cols, cols)``."""
    H = hessian.clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise ValueError("the damped Hessian is not positive definite; raise quant.percdamp "
                         "or use more calibration tokens")
    return U, dead


def _check(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (rows, cols), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cfg.method != "none" and tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight of shape {(rows, cols)}, "
                         f"got {tuple(hessian.shape)}")
    if cfg.method == "hbllm":
        if rows % 2:
            raise ValueError(f"HBLLM pairs adjacent rows (salient residual{', col layout' if cfg.layout == 'col' else ''}): "
                             f"rows={rows} must be even")
        if cfg.layout == "row" and cols % 2:
            raise ValueError(f"HBLLM row layout pairs adjacent columns inside a block: cols={cols} must be even")


def quantize_block(w: torch.Tensor, d: torch.Tensor, cfg: QuantConfig):
    """Quantize one block ``w`` ``(R, C)`` given ``d = diag(U)`` of its columns ``(C,)``.
    Returns ``(q, salient indices (k,), codes)``."""
    if cfg.method == "sign":
        q, codes = sign_block(w)
        return q, w.new_zeros(0, dtype=torch.long), codes
    sal = select_salient(w, d, cfg.salient_metric, cfg.up_lim)
    if cfg.method == "billm":
        q, codes = billm_block(w, sal)
    elif cfg.layout == "row":
        q, codes = row_layout(w, sal, cfg.partition, cfg.shared_mean, cfg.haar_inverse)
    else:
        q, codes = col_layout(w, sal, cfg.partition, cfg.shared_mean, cfg.haar_inverse)
    return q, sal, codes


# blocks whose max |w| lies outside [2^-UNIT_RANGE, 2^UNIT_RANGE] are quantized divided by a power
# of two (exact in floating point), so squares and sums stay finite up to the fp32 range
UNIT_RANGE = 20


def _quantize_block_unit_scale(w: torch.Tensor, d: torch.Tensor, cfg: QuantConfig):
    """:func:`quantize_block` of ``w / s`` times ``s``, with ``s = 2^floor(log2 max|w|)`` for
    blocks of extreme magnitude and 1 otherwise (no host sync). The methods are scale-equivariant,
    so this changes nothing but overflow (|w| > ~1e19 gave all-NaN) and underflow."""
    amax = w.abs().amax()
    exp = torch.floor(torch.log2(amax))
    extreme = torch.isfinite(exp) & (exp.abs() > UNIT_RANGE)
    s = torch.where(extreme, torch.exp2(exp), torch.ones_like(exp))
    q, sal, codes = quantize_block(w / s, d, cfg)
    return q * s, sal, _rescale_codes(codes, s)


def _rescale_codes(codes, s: torch.Tensor):
    """``codes`` with the value-carrying fields (``q``, ``mean``, ``scale``) of every
    NamedTuple in it multiplied by ``s``."""
    if isinstance(codes, tuple) and hasattr(codes, "_fields"):
        return codes._replace(**{f: getattr(codes, f) * s for f in ("q", "mean", "scale")
                                 if f in codes._fields})
    if isinstance(codes, dict):
        return {k: _rescale_codes(v, s) for k, v in codes.items()}
    if isinstance(codes, (tuple, list)):
        return type(codes)(_rescale_codes(v, s) for v in codes)
    return codes


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig,
                    return_codes: bool = False, progress: bool = False) -> QuantResult:
    """Quantize ``weight`` ``(rows, cols)`` with Hessian proxy ``hessian`` ``(cols, cols)``.

    Runs in float32 on ``weight``'s device. ``method="none"`` returns the weight unchanged.
    """
    _check(weight, hessian, cfg)
    rows, cols = weight.shape
    tick = time.perf_counter()
    if cfg.method == "none":
        return QuantResult(weight, 0.0, {"paper": FP_BASELINE_BITS, "full": FP_BASELINE_BITS},
                           weight.numel(), time_s=0.0)
    W = weight.detach().to(torch.float32).clone()
    U, dead = upper_inverse_cholesky(hessian.detach().to(W.device, torch.float32), cfg.percdamp)
    W[:, dead] = 0
    row_loss = torch.zeros(rows, device=W.device)
    salient, bits, codes = [], [], []
    starts = range(0, cols, cfg.blocksize)
    for s in tqdm(starts, desc="blocks", leave=False, disable=not progress):
        e = min(s + cfg.blocksize, cols)
        d = U.diagonal()[s:e]
        q, sal, block_codes = _quantize_block_unit_scale(W[:, s:e], d, cfg)
        err = (W[:, s:e] - q) / d
        row_loss += err.square().sum(1) / 2
        W[:, s:e] = q
        if not cfg.disable_gptq and e < cols:
            W[:, e:] -= err @ U[s:e, e:]
        salient.append(sal)
        bits.append(block_bits(cfg.method, cfg.layout, cfg.shared_mean, rows, e - s, sal.numel(), cfg.blocksize))
        if return_codes:
            codes.append({"start": s, "end": e, "salient_idx": sal, **block_codes})
    numel = weight.numel()
    return QuantResult(
        weight=W.to(weight.dtype),
        loss=float(row_loss.sum()),
        bits={"paper": sum(b[0] for b in bits) / numel, "full": sum(b[1] for b in bits) / numel},
        numel=numel,
        row_loss=row_loss,
        salient=salient,
        block_bits=bits,
        time_s=time.perf_counter() - tick,
        codes=codes if return_codes else None,
    )

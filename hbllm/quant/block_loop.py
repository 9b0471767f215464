"""``quantize_weight``: the entry point for every method, and the GPTQ-style block loop shared by
the block quantizers (docs/method.md section 1): each block of columns is quantized at once, its
error ``(W - Q)/d`` compensated on the later columns only. Methods with their own column loop (GPTQ,
PB-LLM, RTN) get the weight and Hessian instead (:class:`~hbllm.quant.registry.Method`)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .registry import BlockQuantizer, Codes, LoopOutput

FP_BASELINE_BITS = 16.0


@dataclass
class QuantResult:
    """Result of :func:`quantize_weight`.

    weight: dequantized weight (same shape, dtype, device as the input); loss: GPTQ loss
    ``sum((W-Q)^2/d^2)/2``; row_loss: its per-row terms ``(rows,)``; bits: ``{"paper", "full"}``
    bits per weight; numel: number of weights; salient: per span, the salient column indices
    (relative to the span start); block_bits: per span ``(paper, full)`` bits; time_s: seconds;
    codes: per span (a block, or the whole weight for column-loop methods), the method's typed
    codes, what a packed checkpoint stores (only with ``return_codes=True``).
    """

    weight: torch.Tensor
    loss: float
    bits: dict[str, float]
    numel: int
    row_loss: torch.Tensor | None = None
    salient: list[torch.Tensor] = field(default_factory=list)
    block_bits: list[tuple] = field(default_factory=list)
    time_s: float = 0.0
    codes: list[Codes] | None = None


def _damped(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, dead)``: a copy of ``hessian`` whose dead inputs (``diag(H) == 0``) get ``H[j,j] = 1``,
    damped by ``percdamp * mean(diag H)``; ``dead`` the bool mask of those inputs."""
    H = hessian.clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    return H, dead


def _check_factorized(info: torch.Tensor) -> None:
    if info.item() != 0:
        raise ValueError("the damped Hessian is not positive definite; raise quant.percdamp "
                         "or use more calibration tokens")


def upper_inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (``diag(H) == 0``) get ``H[j,j] = 1``; damp by ``percdamp * mean(diag H)``;
    return ``(U, dead)`` with U the upper Cholesky factor of ``H^-1`` ``(cols, cols)``."""
    H, dead = _damped(hessian, percdamp)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    _check_factorized(info)
    return U, dead


def inverse_cholesky_diagonal(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``diag(U)`` ``(cols,)`` of :func:`upper_inverse_cholesky` from one factorization: with
    ``H^-1 = U^T U``, ``H = U^-1 U^-T``, so ``1 / diag(U)`` is the diagonal of the Cholesky factor
    of ``H`` with rows and columns in reverse order."""
    L, info = torch.linalg.cholesky_ex(_damped(hessian, percdamp)[0].flip(0, 1))
    _check_factorized(info)
    return 1 / L.diagonal().flip(0)


def _check(weight: torch.Tensor, hessian: torch.Tensor, cfg) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (rows, cols), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cfg.spec.quantizes and tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight of shape {(rows, cols)}, "
                         f"got {tuple(hessian.shape)}")
    cfg.spec.check_shape(rows, cols, cfg)


def quantize_block(w: torch.Tensor, d: torch.Tensor, cfg, S: torch.Tensor | None = None):
    """Quantize one block ``w`` ``(R, C)`` with the block quantizer of ``cfg.method`` given
    ``d = diag(U)`` of its columns ``(C,)`` and, for methods with ``block_hessian``, ``S``
    ``(C, C)`` the block's slice of the undamped Hessian. Returns ``(q, codes)``."""
    if not cfg.spec.block_hessian:
        return cfg.spec.block(w, d, cfg)
    if S is None:
        raise ValueError(f"quant.method={cfg.method} needs S, the block's slice of the Hessian")
    return cfg.spec.block(w, d, cfg, S)


# blocks whose max |w| lies outside [2^-UNIT_RANGE, 2^UNIT_RANGE] are quantized divided by a power
# of two (exact in floating point), so squares and sums stay finite up to the fp32 range
UNIT_RANGE = 20
# the value-carrying fields of the codes' tuples (sal_row, row: ARB-LLM's per-row statistics)
SCALED_FIELDS = ("q", "mean", "scale", "sal_row", "row")


def unit_scale_block(block: BlockQuantizer, w: torch.Tensor, d: torch.Tensor, cfg, *extra):
    """``block`` on ``w / s`` (``extra``: its further arguments, passed on), its result times
    ``s``, with ``s = 2^floor(log2 max|w|)`` for blocks of extreme magnitude and 1 otherwise (no
    host sync). The block quantizers are
    scale-equivariant, so this changes nothing but overflow (|w| > ~1e19 gave all-NaN) and
    underflow. Returns ``(q, codes)`` in the weight's scale."""
    amax = w.abs().amax()
    exp = torch.floor(torch.log2(amax))
    extreme = torch.isfinite(exp) & (exp.abs() > UNIT_RANGE)
    s = torch.where(extreme, torch.exp2(exp), torch.ones_like(exp))
    q, codes = block(w / s, d, cfg, *extra)
    return q * s, _rescale_codes(codes, s)


def _rescale_codes(codes, s: torch.Tensor):
    """``codes`` with the fields :data:`SCALED_FIELDS` of every tuple in it times ``s``
    (recursing through the typed codes' dataclass fields)."""
    if dataclasses.is_dataclass(codes):
        return dataclasses.replace(codes, **{f.name: _rescale_codes(getattr(codes, f.name), s)
                                             for f in dataclasses.fields(codes) if f.init})
    if isinstance(codes, tuple) and hasattr(codes, "_fields"):
        return codes._replace(**{f: getattr(codes, f) * s for f in SCALED_FIELDS
                                 if f in codes._fields and getattr(codes, f) is not None})
    return codes


def block_loop(W: torch.Tensor, H: torch.Tensor, block: BlockQuantizer, cfg,
               progress: bool = False, block_hessian: bool = False) -> LoopOutput:
    """Run ``block`` over blocks of ``cfg.blocksize`` columns of ``W`` ``(rows, cols)`` (float32,
    modified in place), compensating each block's error on the later columns (unless
    ``cfg.disable_gptq``). ``block_hessian``: pass ``block`` the block's slice ``H[s:e, s:e]`` of
    the undamped Hessian ``H`` too."""
    rows, cols = W.shape
    U, dead = upper_inverse_cholesky(H, cfg.percdamp)
    W[:, dead] = 0
    row_loss = torch.zeros(rows, device=W.device)
    codes = []
    for s in tqdm(range(0, cols, cfg.blocksize), desc="blocks", leave=False, disable=not progress):
        e = min(s + cfg.blocksize, cols)
        d = U.diagonal()[s:e]
        extra = (H[s:e, s:e],) if block_hessian else ()
        q, block_codes = unit_scale_block(block, W[:, s:e], d, cfg, *extra)
        err = (W[:, s:e] - q) / d
        row_loss += err.square().sum(1) / 2
        W[:, s:e] = q
        if not cfg.disable_gptq and e < cols:
            W[:, e:] -= err @ U[s:e, e:]
        codes.append(block_codes)
    return LoopOutput(W, row_loss, codes)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, cfg,
                    return_codes: bool = False, progress: bool = False) -> QuantResult:
    """Quantize ``weight`` ``(rows, cols)`` with Hessian proxy ``hessian`` ``(cols, cols)`` by
    ``cfg.method`` (:class:`hbllm.QuantConfig`).

    Runs in float32 on ``weight``'s device. ``method="none"`` returns the weight unchanged.
    """
    _check(weight, hessian, cfg)
    method = cfg.spec
    if not method.quantizes:
        return QuantResult(weight, 0.0, {"paper": FP_BASELINE_BITS, "full": FP_BASELINE_BITS},
                           weight.numel(), time_s=0.0)
    tick = time.perf_counter()
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(W.device, torch.float32)
    if method.loop is not None:
        out = method.loop(W, H.clone(), cfg)
    else:
        out = block_loop(W, H, method.block, cfg, progress, method.block_hessian)
    bits = [method.bits(cfg, c) for c in out.codes]
    numel = weight.numel()
    return QuantResult(
        weight=out.weight.to(weight.dtype),
        loss=float(out.row_loss.sum()),
        bits={"paper": sum(b[0] for b in bits) / numel, "full": sum(b[1] for b in bits) / numel},
        numel=numel,
        row_loss=out.row_loss,
        salient=[c.salient for c in out.codes],
        block_bits=bits,
        time_s=time.perf_counter() - tick,
        codes=out.codes if return_codes else None,
    )

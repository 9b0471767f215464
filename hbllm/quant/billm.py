"""BiLLM ("braq") block quantizer (METHOD.md section 6): B2 on the salient columns; the other
entries split once by one magnitude threshold (81 quantiles of their |W|), each group B1_abs."""
from __future__ import annotations

import torch

from .binarize import binarize2
from .split_search import split_binarize


def billm_block(w: torch.Tensor, sal: torch.Tensor):
    """Quantize a block ``w`` ``(R, C)`` with salient columns ``sal``. Returns ``(q, codes)``."""
    plain = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    plain[sal] = False
    q = torch.empty_like(w)
    ws = w[:, sal]
    first, second = binarize2(ws, torch.ones_like(ws, dtype=torch.bool))
    q[:, sal] = first.q + second.q
    q[:, plain], main = split_binarize(w[:, plain], "global", False, "abs")
    return q, {"main": main, "salient": (first, second)}

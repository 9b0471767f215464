"""Sign binarization baseline: per row of a block, ``sign(w - m) * mean|w - m| + m`` (B1_abs)."""
from __future__ import annotations

import torch

from .binarize import binarize


def sign_block(w: torch.Tensor):
    """Quantize a block ``w`` ``(R, C)``. Returns ``(q, codes)``."""
    b = binarize(w, torch.ones_like(w, dtype=torch.bool), "abs")
    return b.q, {"main": b}

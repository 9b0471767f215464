"""Random packed codes (uniform bits, plausible statistics) for the packed-format tests and
``scripts/profile_gemv.py``."""
from __future__ import annotations

import torch

from hbllm.packed.codes import BandCodes, BlockCodes, LinearCodes


def random_band(r: int, n: int, shared: bool, gen: torch.Generator) -> BandCodes:
    mean = torch.randn(r, 1 if shared else 2, generator=gen) * 0.05
    scale = torch.rand(r, 2, generator=gen) * 0.1 + 0.01
    return BandCodes(torch.rand(r, n, generator=gen) < 0.5, torch.rand(r, n, generator=gen) < 0.3,
                     mean, scale)


def random_codes(layout: str, rows: int, cols: int, blocksize: int = 128, shared: bool = False,
                 inverse: str = "exact", max_k: int = 49, seed: int = 0,
                 zero_k_block: bool = False) -> LinearCodes:
    """Random codes with k in [1, max_k] salient columns per block (block 0 has none if
    ``zero_k_block``)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for b in range(cols // blocksize):
        k = 0 if (zero_k_block and b == 0) else int(torch.randint(1, max_k + 1, (1,), generator=gen))
        sal = torch.randperm(blocksize, generator=gen)[:k].sort().values
        if layout == "row":
            low, high = (random_band(rows, blocksize // 2, shared, gen) for _ in range(2))
        else:
            low, high = (random_band(rows // 2, blocksize - k, shared, gen) for _ in range(2))
        sl, sh = (random_band(rows // 2, k, False, gen) for _ in range(2)) if k else (None, None)
        blocks.append(BlockCodes(sal, low, high, sl, sh))
    return LinearCodes(layout, rows, cols, blocksize, inverse, blocks)

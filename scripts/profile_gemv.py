"""Run one packed kernel (lut, mma or triton; default lut) a few times on a 4096x4096 HBLLM-row
layer, batch 1 (tiled layout), for ``ncu``:

    ncu --clock-control none --kernel-name regex:hbllm_lut --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis python3 scripts/profile_gemv.py lut
"""
import sys

import torch

from hbllm.packed.format import linear_meta, pack_linear
from hbllm.packed.module import PackedLinear
from hbllm.packed.synthetic import random_codes

codes = random_codes("row", 4096, 4096, max_k=12, seed=0)
mod = PackedLinear(pack_linear(codes), linear_meta(codes), device="cuda")
mod.gemv = sys.argv[1] if len(sys.argv) > 1 else "lut"
x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
for _ in range(5):
    mod(x)
torch.cuda.synchronize()

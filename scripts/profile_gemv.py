"""Run the packed GEMV a few times on a 4096x4096 HBLLM-row layer (for ``ncu``):

    ncu --kernel-name regex:hbllm_gemv --launch-skip 3 --launch-count 1 python3 scripts/profile_gemv.py
"""
import torch

from hbllm.packed.format import linear_meta, pack_linear
from hbllm.packed.module import PackedLinear
from hbllm.packed.synthetic import random_codes

codes = random_codes("row", 4096, 4096, max_k=12, seed=0)
mod = PackedLinear(pack_linear(codes), linear_meta(codes), device="cuda")
x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
for _ in range(5):
    mod(x)
torch.cuda.synchronize()

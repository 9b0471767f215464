"""Run one packed kernel (lut, mma, cb, tile or triton; default lut) a few times on a ROWSxCOLS HBLLM-row
layer (default 4096x4096; tiled layout) at a number of tokens (default 1), for ``ncu``:

    ncu --clock-control none --kernel-name regex:hbllm_lut --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis python3 scripts/profile_gemv.py lut
    ... --kernel-name regex:hbllm_mma ... python3 scripts/profile_gemv.py mma 16
    ... python3 scripts/profile_gemv.py lut 1 11008 4096
"""
import sys
from pathlib import Path

import torch

from hbllm.packed.format import linear_meta, pack_linear
from hbllm.packed.module import PackedLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from packed_synthetic import random_codes  # noqa: E402 (the tests' random codes)

tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 1
rows, cols = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (4096, 4096)
codes = random_codes("row", rows, cols, max_k=12, seed=0)
mod = PackedLinear(pack_linear(codes), linear_meta(codes), device="cuda")
mod.gemv = sys.argv[1] if len(sys.argv) > 1 else "lut"
x = torch.randn(tokens, cols, device="cuda", dtype=torch.float16)
for _ in range(5):
    mod(x)
torch.cuda.synchronize()

"""The Triton column kernel (hbllm/quant/column_kernel.py) equals the tensor-operation column loop
bit for bit, for every GPTQ and PB-LLM option. Runs on CUDA; on a CPU with triton installed, run
it through the interpreter: ``TRITON_INTERPRET=1 python -m pytest tests/test_column_kernel.py``."""
import os

import pytest
import torch

from hbllm.config import QuantConfig
from hbllm.quant import gptq, quantize_weight

pytest.importorskip("triton")
if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    rows, cols = 37, 96  # a partial row tile
    w = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g) ** 2
    x = torch.randn(512, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    h = 2 / 512 * x.T @ x
    h[5, :] = h[:, 5] = 0  # a dead input
    return w.to(DEVICE), h.to(DEVICE)


@pytest.mark.parametrize("kw", [
    dict(method="gptq", wbits=3), dict(method="gptq", wbits=2, groupsize=16),
    dict(method="gptq", wbits=4, groupsize=32, sym=True),
    dict(method="gptq", wbits=3, groupsize=40),  # groups straddle the 48-column blocks
    dict(method="gptq", wbits=3, groupsize=16, act_order=True),
    dict(method="gptq", wbits=3, groupsize=16, act_order=True, static_groups=True),
    dict(method="gptq", wbits=8, blocksize=40),  # a partial last block
    dict(method="pbllm", low_frac=0.9), dict(method="pbllm", low_frac=0.7, salient_metric="magnitude"),
    dict(method="pbllm", low_frac=0.8, groupsize=48, high_bit=4)])
def test_kernel_equals_tensor_loop(problem, kw, monkeypatch):
    w, h = problem
    cfg = QuantConfig(**{"blocksize": 48, **kw})
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(gptq, "BACKEND", backend)
        out[backend] = quantize_weight(w, h, cfg, return_codes=True)
    a, b = out["torch"], out["triton"]
    assert torch.equal(a.weight, b.weight)
    assert a.loss == b.loss
    assert a.bits == b.bits
    assert torch.equal(a.codes[0].dequantize(), b.codes[0].dequantize())

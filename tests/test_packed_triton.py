"""Triton path of PackedLinear vs the dequantized-weight matmul (runs only on a CUDA machine)."""
import pytest
import torch

from hbllm.packed.codes import dequantize
from hbllm.packed.format import linear_meta, pack_linear
from hbllm.packed.module import PackedLinear, triton_kernels
from hbllm.packed.synthetic import random_codes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or triton_kernels is None,
                                reason="needs CUDA and triton")
CASES = [("row", False, "exact"), ("row", True, "exact"), ("col", False, "exact"),
         ("col", True, "authors"), ("row", False, "authors")]


@pytest.mark.parametrize("layout,shared,inverse", CASES)
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_dequantized(layout, shared, inverse, batch, dtype):
    torch.manual_seed(batch)
    codes = random_codes(layout, 200, 512, shared=shared, inverse=inverse, seed=batch,
                         zero_k_block=(batch == 5))
    bias = torch.randn(200)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes), bias).cuda()
    x = torch.randn(batch, 512, device="cuda").to(dtype)
    ref = x.double() @ dequantize(codes).double().cuda().T + bias.double().cuda()
    y = mod(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    tol = 4e-3 if dtype == torch.float16 else 1.6e-2
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    mod.use_triton = False
    y_torch = mod(x)
    assert ((y_torch.double() - ref).norm() / ref.norm()).item() < tol


def test_triton_3d_input_and_odd_rows_tile():
    codes = random_codes("row", 66, 256, seed=7)  # 66 rows: last GEMV tile is partial
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize(codes).double().cuda().T
    for n in (1, 3):
        y = mod(x[:, :n])
        r = ref[:, :n]
        assert ((y.double() - r).norm() / r.norm()).item() < 4e-3

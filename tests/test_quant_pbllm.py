"""PB-LLM equals its slow loop reference (tests/reference_pbllm.py); bits and codes."""
import pytest
import torch

import reference_pbllm as ref
from hbllm.config import QuantConfig
from hbllm.quant import quantize_weight


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 48, generator=g) * torch.rand(1, 48, generator=g) ** 2
    x = torch.randn(256, 48, generator=g) @ (torch.eye(48) + 0.3 * torch.randn(48, 48, generator=g))
    h = 2 / 256 * x.T @ x
    h[7, :] = h[:, 7] = 0
    return w, h


@pytest.mark.parametrize("kw", [dict(low_frac=0.9), dict(low_frac=0.7, salient_metric="magnitude"),
                                dict(low_frac=0.8, groupsize=24, high_bit=4)])
def test_pbllm_matches_reference(problem, kw):
    w, h = problem
    cfg = QuantConfig(method="pbllm", blocksize=12 if "groupsize" in kw else 16, **kw)
    res = quantize_weight(w, h, cfg, return_codes=True)
    q, binary, loss = ref.pbllm(w, h, kw["low_frac"], kw.get("high_bit", 8),
                                kw.get("salient_metric", "hessian"), kw.get("groupsize", -1))
    assert torch.equal(res.codes[0].binary, binary)
    assert float((res.weight.double() - q).norm() / q.norm()) < 1e-5
    assert res.loss == pytest.approx(loss, rel=1e-4)


def test_bits_hand_count_and_codes(problem):
    w, h = problem
    res = quantize_weight(w, h, QuantConfig(method="pbllm", low_frac=0.75), return_codes=True)
    (codes,) = res.codes
    n_bin = int(codes.binary.sum())
    assert n_bin == int(384 * 0.75) + 1  # the floor(0.75 n)-th smallest criterion and all below
    paper = n_bin + (384 - n_bin) * 8
    # + 1 map bit per weight, fp16 mean and scale per row, fp16 scale and 8-bit zero per row
    assert res.block_bits == [(paper, paper + 384 + 8 * 32 + 8 * 24)]
    assert codes.stored_bits() == res.block_bits[0][1]
    assert torch.equal(codes.dequantize(), res.weight)


def test_more_high_bit_weights_lower_the_error(problem):
    w, h = problem
    errs = [quantize_weight(w, h, QuantConfig(method="pbllm", low_frac=f)).loss for f in (0.95, 0.8, 0.5)]
    assert errs[0] > errs[1] > errs[2]

"""RTN and GPTQ equal their slow loop references (tests/reference_gptq.py); their codes rebuild
the weight and count the full bits."""
import pytest
import torch

import reference_gptq as ref
from hbllm.config import QuantConfig
from hbllm.quant import quantize_weight

ROWS, COLS = 8, 48


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g) * torch.rand(1, COLS, generator=g) ** 2
    x = torch.randn(256, COLS, generator=g) @ (torch.eye(COLS) + 0.3 * torch.randn(COLS, COLS, generator=g))
    h = 2 / 256 * x.T @ x
    h[5, :] = h[:, 5] = 0  # a dead input
    return w, h


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("wbits,groupsize", [(2, -1), (3, 16), (4, 20), (8, -1)])
def test_rtn_matches_reference(problem, wbits, groupsize):
    w, h = problem
    res = quantize_weight(w, h, QuantConfig(method="rtn", wbits=wbits, groupsize=groupsize))
    assert rel(res.weight, ref.rtn(w, wbits, groupsize)) < 1e-6
    assert res.bits["paper"] == wbits


@pytest.mark.parametrize("kw", [
    dict(wbits=3), dict(wbits=2, groupsize=16), dict(wbits=3, groupsize=16, sym=True),
    dict(wbits=4, groupsize=32),  # groups straddle the 24-column blocks
    dict(wbits=3, groupsize=16, act_order=True), dict(wbits=3, groupsize=16, act_order=True, static_groups=True),
    dict(wbits=4, groupsize=20, static_groups=True)])
def test_gptq_matches_reference(problem, kw):
    w, h = problem
    res = quantize_weight(w, h, QuantConfig(method="gptq", blocksize=24, **kw))
    q, loss = ref.gptq(w, h, blocksize=24, **kw)
    assert rel(res.weight, q) < 1e-5
    assert res.loss == pytest.approx(loss, rel=1e-4)


def test_gptq_beats_rtn_on_the_output(problem):
    w, h = problem
    L = torch.linalg.cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(COLS))
    err = {m: float(((w - quantize_weight(w, h, QuantConfig(method=m, wbits=3, groupsize=16)).weight) @ L).norm())
           for m in ("rtn", "gptq")}
    assert err["gptq"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("kw,full", [
    # 4 rows x 64 cols, 3 bits: codes 768; per (row, group) fp16 scale + 3-bit zero
    (dict(method="rtn", wbits=3), 768 + 4 * 1 * 19),
    (dict(method="gptq", wbits=3, groupsize=16), 768 + 4 * 4 * 19),
    (dict(method="gptq", wbits=3, groupsize=16, sym=True), 768 + 4 * 4 * 16),  # no zero points
    (dict(method="gptq", wbits=3, groupsize=16, act_order=True), 768 + 4 * 4 * 19 + 64 * 2),  # group map
    (dict(method="gptq", wbits=3, groupsize=16, act_order=True, static_groups=True), 768 + 4 * 4 * 19),
])
def test_full_bits_hand_count_and_codes(kw, full):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(4, 64, generator=g), torch.randn(128, 64, generator=g)
    res = quantize_weight(w, 2 / 128 * x.T @ x, QuantConfig(**kw), return_codes=True)
    assert res.block_bits == [(768, full)]
    assert sum(c.stored_bits() for c in res.codes) == full
    assert res.bits == {"paper": 3.0, "full": full / 256}
    assert torch.equal(torch.cat([c.dequantize() for c in res.codes], 1), res.weight)


def test_inverse_cholesky_diagonal_equals_the_full_factor(problem):
    from hbllm.quant.block_loop import inverse_cholesky_diagonal, upper_inverse_cholesky
    _, h = problem  # with a dead input
    d = inverse_cholesky_diagonal(h.double(), 0.01)
    assert torch.allclose(d, upper_inverse_cholesky(h.double(), 0.01)[0].diagonal(), rtol=1e-10, atol=0)

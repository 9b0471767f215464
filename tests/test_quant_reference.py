"""The fast quantizer equals the slow loop-based reference (tests/reference_quant.py)."""
import itertools

import pytest
import torch

import reference_quant as ref
from hbllm.config import QuantConfig
from hbllm.quant import quantize_weight

ROWS, COLS, BLOCK = 8, 48, 24


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g) * torch.rand(1, COLS, generator=g) ** 2
    x = torch.randn(256, COLS, generator=g) @ (torch.eye(COLS) + 0.3 * torch.randn(COLS, COLS, generator=g))
    return w, 2 / 256 * x.T @ x


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layout,partition,shared_mean,inverse",
                         list(itertools.product(["row", "col"], ["row", "global"], [False, True],
                                                ["exact", "authors"])))
@pytest.mark.parametrize("metric", ["l2", "l1", "magnitude"])
def test_hbllm_matches_reference(problem, layout, partition, shared_mean, inverse, metric):
    w, h = problem
    cfg = QuantConfig(method="hbllm", layout=layout, partition=partition, shared_mean=shared_mean,
                      salient_metric=metric, blocksize=BLOCK, up_lim=12, haar_inverse=inverse)
    res = quantize_weight(w, h, cfg)
    q, loss, salient = ref.quantize(w, h, "hbllm", layout, partition, shared_mean, metric, 12, BLOCK,
                                    0.01, inverse)
    assert [s.tolist() for s in res.salient] == salient
    assert rel(res.weight, q) < 1e-5
    assert res.loss == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("method", ["billm", "sign"])
@pytest.mark.parametrize("disable_gptq", [False, True])
def test_baselines_match_reference(problem, method, disable_gptq):
    w, h = problem
    cfg = QuantConfig(method=method, blocksize=BLOCK, up_lim=12, disable_gptq=disable_gptq)
    res = quantize_weight(w, h, cfg)
    q, loss, _ = ref.quantize(w, h, method, salient_metric=cfg.salient_metric, up_lim=12, blocksize=BLOCK,
                              disable_gptq=disable_gptq)
    assert rel(res.weight, q) < 1e-5
    assert res.loss == pytest.approx(loss, rel=1e-5)


def test_disable_gptq_matches_reference(problem):
    w, h = problem
    cfg = QuantConfig(method="hbllm", blocksize=BLOCK, up_lim=12, disable_gptq=True)
    q, _, _ = ref.quantize(w, h, "hbllm", up_lim=12, blocksize=BLOCK, disable_gptq=True)
    assert rel(quantize_weight(w, h, cfg).weight, q) < 1e-5


def test_ties_and_zeros_match_reference(problem):
    """Rows with exact ties and zeros (as in weights dequantized from a GGUF file)."""
    g = torch.Generator().manual_seed(3)
    w = torch.round(torch.randn(ROWS, COLS, generator=g) * 2) / 2
    h = problem[1]
    for layout in ("row", "col"):
        cfg = QuantConfig(method="hbllm", layout=layout, blocksize=BLOCK, up_lim=12)
        q, _, _ = ref.quantize(w, h, "hbllm", layout, up_lim=12, blocksize=BLOCK)
        assert rel(quantize_weight(w, h, cfg).weight, q) < 1e-5

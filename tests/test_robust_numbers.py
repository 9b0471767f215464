"""Numbers checked where they enter: extreme magnitudes stay finite in the quantizers,
non-finite weights and Hessians fail naming the layer and linear, results.json is strict JSON."""
import json
import math

import pytest
import torch

from hbllm import quantize_weight
from hbllm.config import QuantConfig
from hbllm.results import Results


def _problem(seed=0, rows=16, cols=128):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(256, cols, generator=g)
    return W, X.T @ X / 256


@pytest.mark.parametrize("cfg", [QuantConfig(blocksize=64), QuantConfig(layout="col", blocksize=64),
                                 QuantConfig(partition="global", blocksize=64),
                                 QuantConfig(method="billm", blocksize=64), QuantConfig(method="sign"),
                                 QuantConfig(method="arbllm_x", blocksize=64),
                                 QuantConfig(method="arbllm_rc", blocksize=64)],
                         ids=lambda c: f"{c.label}-{c.partition}")
@pytest.mark.parametrize("k", [63, 100, 125, -100])
def test_quantizers_are_scale_equivariant_up_to_the_fp32_range(cfg, k):
    W, H = _problem()
    want = quantize_weight(W, H, cfg).weight * 2.0 ** k
    got = quantize_weight(W * 2.0 ** k, H, cfg).weight  # |W| up to ~1e38 (k=125)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["arbllm_x", "arbllm_rc"])
@pytest.mark.parametrize("k", [1, -18])
def test_arbllm_is_scale_equivariant_inside_the_unit_range(method, k):
    """No unit scaling by the block loop here (|W| ~ 2^-18 is inside its range): ARB-LLM's block
    quantizer works at unit scale itself, so its absolute denominator guards change nothing."""
    W, H = _problem()
    cfg = QuantConfig(method=method, blocksize=64)
    want = quantize_weight(W, H, cfg).weight * 2.0 ** k
    assert torch.equal(quantize_weight(W * 2.0 ** k, H, cfg).weight, want)


def test_extreme_blocks_return_codes_in_the_weight_scale():
    W, H = _problem(rows=8, cols=128)
    cfg = QuantConfig(blocksize=64)
    base = quantize_weight(W, H, cfg, return_codes=True).codes
    big = quantize_weight(W * 2.0 ** 100, H, cfg, return_codes=True).codes
    for b0, b1 in zip(base, big):
        for part in ("main", "residual"):
            c0, c1 = getattr(b0, part), getattr(b1, part)
            assert torch.equal(c1.mean, c0.mean * 2.0 ** 100)
            assert torch.equal(c1.scale, c0.scale * 2.0 ** 100)
            assert torch.equal(c1.sign, c0.sign) and torch.equal(c1.upper, c0.upper)


def test_results_json_is_strict(tmp_path):
    r = Results(tmp_path / "results.json", "k")
    r.update(layers=[{"loss": float("nan")}], ppl={"x": float("inf")})
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert data["layers"][0]["loss"] is None and data["ppl"]["x"] is None
    assert math.isnan(r.data["layers"][0]["loss"] if r.data["layers"][0]["loss"] is not None
                      else float("nan"))

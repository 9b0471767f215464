"""The method registry: per-method fields and checks at start-up, labels, codes that rebuild
the weight and count the full bits for every method, and a method added by registration only."""
from dataclasses import dataclass

import pytest
import torch

from conftest import compose
from hbllm.config import QuantConfig, validate
from hbllm.quant import Method, get_method, method_names, quantize_weight, registry
from hbllm.quant.bits import FP_BITS

EVERY_METHOD = [dict(method="hbllm"), dict(method="hbllm", layout="col", shared_mean=True),
                dict(method="billm"), dict(method="sign"), dict(method="rtn", wbits=2, groupsize=32),
                dict(method="gptq", wbits=3, groupsize=32, act_order=True), dict(method="pbllm"),
                dict(method="arbllm_x"), dict(method="arbllm_rc"),
                dict(method="arbllm_x", cgb=False, arb_split_on="w", arb_iters=2, arb_x_iters=3)]


def test_every_method_is_registered():
    assert set(method_names()) >= {"none", "hbllm", "billm", "sign", "rtn", "gptq", "pbllm", "arbllm_x",
                                   "arbllm_rc"}
    assert [m for m in method_names() if get_method(m).packable] == ["hbllm"]
    with pytest.raises(ValueError, match="quant.method='ternary' is not one of"):
        QuantConfig(method="ternary")


@pytest.mark.parametrize("kw", EVERY_METHOD)
def test_codes_rebuild_the_weight_and_count_the_full_bits(kw):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 96, generator=g), torch.randn(256, 96, generator=g)
    cfg = QuantConfig(blocksize=32, **kw)
    res = quantize_weight(w, 2 / 256 * x.T @ x, cfg, return_codes=True)
    assert torch.allclose(torch.cat([c.dequantize() for c in res.codes], 1), res.weight, atol=1e-6)
    assert [c.stored_bits() for c in res.codes] == [b[1] for b in res.block_bits]
    assert res.bits["full"] > res.bits["paper"]


def test_method_defaults_and_fields():
    assert QuantConfig(method="billm").salient_metric == "l1"
    assert QuantConfig(method="pbllm").salient_metric == "hessian"
    gptq = QuantConfig(method="gptq")
    assert (gptq.wbits, gptq.groupsize, gptq.sym, gptq.act_order, gptq.static_groups) == (4, -1, False, False, False)
    assert QuantConfig(method="hbllm").wbits is None
    assert (QuantConfig(method="pbllm").low_frac, QuantConfig(method="pbllm").high_bit) == (0.9, 8)
    x, rc = QuantConfig(method="arbllm_x"), QuantConfig(method="arbllm_rc")
    fields = lambda c: (c.salient_metric, c.arb_iters, c.arb_x_iters, c.cgb, c.arb_split_on)  # noqa: E731
    assert fields(x) == ("l1", 15, 15, True, "t") and fields(rc) == ("l1", 15, None, True, "t")
    assert (x.label, rc.label) == ("arbllm_x", "arbllm_rc")
    assert QuantConfig(method="arbllm_x", cgb=False, arb_split_on="w").label == "arbllm_x_nocgb_splitw"


@pytest.mark.parametrize("kw,message", [
    (dict(method="hbllm", wbits=3), "quant.wbits=3 does not apply to quant.method=hbllm"),
    (dict(method="rtn", salient_metric="l2"), "quant.salient_metric='l2' does not apply"),
    (dict(method="sign", low_frac=0.9), "does not apply to quant.method=sign"),
    (dict(method="rtn", wbits=5), "quant.wbits=5 is not one of"),
    (dict(method="gptq", wbits=1), "quant.wbits=1 must be an integer in"),
    (dict(method="gptq", static_groups=True), "static_groups=true needs quant.groupsize"),
    (dict(method="gptq", groupsize=0), "quant.groupsize=0"),
    (dict(method="pbllm", low_frac=1.0), "quant.low_frac"),
    (dict(method="pbllm", groupsize=100), "multiple of quant.blocksize"),
    (dict(method="pbllm", salient_metric="l2"), "not one of .*hessian"),
    (dict(method="billm", salient_metric="hessian"), "not one of .*l1"),
    (dict(method="hbllm", blocksize=7), "blocksize=7 must be even"),
    (dict(method="arbllm_rc", arb_x_iters=3), "quant.arb_x_iters=3 does not apply to quant.method=arbllm_rc"),
    (dict(method="billm", cgb=False), "quant.cgb=False does not apply to quant.method=billm"),
    (dict(method="arbllm_x", arb_iters=-1), "quant.arb_iters=-1 must be an integer >= 0"),
    (dict(method="arbllm_x", arb_split_on="h"), "quant.arb_split_on='h' is not one of"),
    (dict(method="arbllm_rc", cgb="yes"), "quant.cgb='yes' must be true or false"),
    (dict(method="arbllm_x", salient_metric="hessian"), "not one of .*l1"),
])
def test_invalid_fields_fail_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kw)


def test_hydra_presets_validate_per_method():
    assert validate(compose("quant=rtn", "quant.wbits=3")).quant.label == "rtn_w3"
    assert validate(compose("quant=gptq_w3g128")).quant.wbits == 3
    assert validate(compose("quant=pbllm", "quant.low_frac=0.8")).quant.label == "pbllm_lf80"
    with pytest.raises(ValueError, match="does not apply to quant.method=hbllm"):
        validate(compose("quant=hbllm_row", "quant.wbits=3"))
    with pytest.raises(ValueError, match="quant.method=hbllm"):
        validate(compose("quant=gptq_w3g128", "save_packed=true"))


@dataclass
class HalfCodes:
    """Toy codes: one fp16 scale per row, a sign bit per weight."""

    sign: torch.Tensor
    scale: torch.Tensor
    salient = torch.zeros(0, dtype=torch.long)

    def dequantize(self):
        return self.sign * self.scale

    def stored_bits(self):
        return self.sign.numel() + FP_BITS * self.scale.numel()


def test_a_method_is_one_registration():
    """A method added with register() alone (no change to config, pipeline or app) runs through
    QuantConfig and quantize_weight, under the shared GPTQ block loop."""

    def block(w, d, cfg):
        codes = HalfCodes(torch.sign(w), w.abs().mean(1, keepdim=True))
        return codes.dequantize(), codes

    registry.register(Method("toy_sign", lambda cfg: "toy_sign", lambda cfg, c: (c.sign.numel(), c.stored_bits()),
                             block=block))
    try:
        cfg = QuantConfig(method="toy_sign", blocksize=16)
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(4, 32, generator=g), torch.randn(64, 32, generator=g)
        h = 2 / 64 * x.T @ x
        res = quantize_weight(w, h, cfg, return_codes=True)
        assert cfg.label == "toy_sign" and res.bits == {"paper": 1.0, "full": 1.0 + 2 * FP_BITS / 32}
        # the first block is the toy quantizer itself; the second sees the compensated weight
        assert torch.equal(res.weight[:, :16], torch.sign(w[:, :16]) * w[:, :16].abs().mean(1, keepdim=True))
        assert res.loss > 0
    finally:
        registry._METHODS.pop("toy_sign")


def test_a_block_quantizer_can_ask_for_its_hessian_block():
    """With block_hessian=True the block loop passes each block its slice of the raw (undamped)
    Hessian as S, and quantize_block asks for it."""
    seen = []

    def block(w, d, cfg, S):
        seen.append(S.clone())
        codes = HalfCodes(torch.sign(w), w.abs().mean(1, keepdim=True))
        return codes.dequantize(), codes

    registry.register(Method("toy_s", lambda cfg: "toy_s", lambda cfg, c: (c.sign.numel(), c.stored_bits()),
                             block=block, block_hessian=True))
    try:
        cfg = QuantConfig(method="toy_s", blocksize=16)
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(4, 40, generator=g), torch.randn(64, 40, generator=g)
        h = 2 / 64 * x.T @ x
        quantize_weight(w, h, cfg)
        assert [tuple(s.shape) for s in seen] == [(16, 16), (16, 16), (8, 8)]
        assert all(torch.equal(s, h[i:i + 16, i:i + 16]) for s, i in zip(seen, (0, 16, 32)))
        from hbllm.quant import quantize_block
        with pytest.raises(ValueError, match="needs S"):
            quantize_block(w[:, :16], torch.ones(16), cfg)
    finally:
        registry._METHODS.pop("toy_s")


@pytest.mark.parametrize("quant,paper_bits", [(["quant=rtn", "quant.wbits=3"], (1.5, 16)),
                                              (["quant=gptq_w3g128"], (1.5, 16)), (["quant=pbllm"], (1.5, 16)),
                                              (["quant=arbllm_x"], (1, 2)), (["quant=arbllm_rc"], (1, 2))])
def test_new_methods_run_end_to_end_on_a_tiny_model(tmp_path, quant, paper_bits):
    from conftest import REPO
    from hbllm import app

    sources = sorted((REPO / "hbllm").glob("*.py"))
    files = lambda paths: "[" + ",".join(str(p) for p in paths) + "]"  # noqa: E731
    results = app.run(compose("model=tiny-llama", *quant, "calib=text_files", f"calib.files={files(sources[::2])}",
                              "calib.nsamples=4", "calib.seqlen=64", "eval.datasets=[text_files]",
                              f"data.eval_files={files(sources[1::2])}", "eval.seqlen=64",
                              "eval.max_windows=2", "logger=disabled"), tmp_path)
    assert results["status"] == "done"
    low, high = paper_bits
    assert results["bits"]["full"] > results["bits"]["paper"]
    assert low < results["bits"]["paper"] < high
    assert results["ppl"]["text_files"] > 1

"""The GPU path against the CPU: ``quantize_weight`` for every quant preset, the layer-wise
pipeline on a tiny model, and the CPU offload of calibration activations.

    python -m pytest -q -rs tests/test_gpu.py      # on a CUDA machine (e.g. one H200)

Every comparison is written as a function of the device and also runs with ``device=cpu``
against the CPU (then it checks determinism and the harness itself); the ``cuda`` cases skip on a
machine without CUDA, with that reason.

Tolerances (docs/quantizers.md, deviation 7: CUDA and CPU differ by ~1e-2 relative where two
split/salient candidates are within float32 noise, and a flip propagates through the GPTQ
compensation; the loss agrees to ~4 digits):
  * weights ``||Q_cuda - Q_cpu||_F / ||Q_cpu||_F <= 5e-2``; loss relative ``<= 1e-2``; bits per
    weight (paper and full) relative ``<= 2e-2`` (a salient column more or less in a block);
  * the tiny-model pipeline: every quantized weight and the logits relative ``<= 5e-2``;
  * offloaded activations change nothing: same ops on the same device, logits within 1e-6.
"""
from pathlib import Path

import pytest
import torch

import hbllm
import hbllm.pipeline as pipeline
from conftest import CONF, compose, tiny
from hbllm.config import validate
from hbllm.models import find_layers
from hbllm.pipeline import quantize_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
QUANT_PRESETS = sorted((CONF / "quant").glob("*.yaml"))

WEIGHT_RTOL, LOSS_RTOL, BITS_RTOL = 5e-2, 1e-2, 2e-2
PIPELINE_RTOL, OFFLOAD_ATOL = 5e-2, 1e-6


def preset(path: Path) -> hbllm.QuantConfig:
    """A hbllm/conf/quant preset as the QuantConfig the app builds from it (composed through its
    defaults list, validated)."""
    return validate(compose(f"quant={path.stem}")).quant


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def heavy_tailed_problem(rows=64, cols=256, tokens=512, seed=0):
    """Student-t weights and correlated inputs with a few outlier channels (like an LLM's)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(2.5).sample((rows, cols)) * 0.02
    x = torch.randn(tokens, 32, generator=g) @ torch.randn(32, cols, generator=g) / 4
    x = x + torch.randn(tokens, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[:4]] *= 15
    return w, 2 / tokens * x.T @ x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", QUANT_PRESETS, ids=lambda p: p.stem)
def test_quantize_weight_on_device_matches_cpu(path, device):
    cfg = preset(path)
    torch.manual_seed(0)
    w, h = heavy_tailed_problem()
    ref = hbllm.quantize_weight(w, h, cfg)
    got = hbllm.quantize_weight(w.to(device), h.to(device), cfg)
    assert got.weight.device.type == device and got.weight.dtype == w.dtype
    assert got.weight.shape == w.shape
    if cfg.method == "none":
        assert torch.equal(got.weight.cpu(), w) and got.bits == ref.bits
        return
    assert rel(got.weight, ref.weight) <= WEIGHT_RTOL
    assert got.loss == pytest.approx(ref.loss, rel=LOSS_RTOL)
    for kind in ("paper", "full"):
        assert got.bits[kind] == pytest.approx(ref.bits[kind], rel=BITS_RTOL)
    assert not torch.equal(got.weight.cpu(), w)  # something was quantized


def quantized_tiny(kind: str, cfg, device, tokens):
    """A tiny model quantized layer by layer on ``device``: (model, stats, where), ``where`` the
    devices seen by each Hessian pass: (layer parameters, calibration activations)."""
    model, _ = tiny(kind)
    _, layers = find_layers(model)
    where = []
    real = pipeline.layer_hessians

    def watching(layer, hidden, kwargs, dev, *weights):
        where.append((next(layer.parameters()).device.type, hidden[0].device.type))
        return real(layer, hidden, kwargs, dev, *weights)

    pipeline.layer_hessians = watching
    try:
        stats = quantize_model(model, tokens, cfg, torch.device(device))
    finally:
        pipeline.layer_hessians = real
    assert all(p.device.type == "cpu" for p in model.parameters())  # everything back on CPU
    assert len(where) == len(layers)
    return model, stats, where


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant", ["sign", "hbllm_row"])
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-opt"])
def test_pipeline_on_device_matches_cpu(kind, quant, device, calib_tokens):
    cfg = preset(CONF / "quant" / f"{quant}.yaml")
    ref, ref_stats, _ = quantized_tiny(kind, cfg, "cpu", calib_tokens)
    got, stats, where = quantized_tiny(kind, cfg, device, calib_tokens)
    assert where == [(device, device)] * len(where)  # tiny activations fit: kept on the device
    want = ref.state_dict()
    for name, value in got.state_dict().items():
        if torch.equal(value, want[name]):
            continue
        assert rel(value, want[name]) <= PIPELINE_RTOL, name
    for a, b in zip(stats.layers, ref_stats.layers):
        assert a["index"] == b["index"]
        assert a["loss"] == pytest.approx(b["loss"], rel=PIPELINE_RTOL)
    ids = calib_tokens[:2]
    with torch.no_grad():
        assert rel(got(ids).logits, ref(ids).logits) <= PIPELINE_RTOL


def fake_free_memory(monkeypatch, free: int, total: int = 80 << 30) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))


def test_activation_device_is_cpu_when_activations_exceed_half_the_free_memory(monkeypatch):
    """The decision alone (runs on CPU: only the device's type and mem_get_info are used)."""
    model, _ = tiny("tiny-llama")  # hidden 64, float32
    nsamples, seqlen = 4, 32
    need = 2 * nsamples * seqlen * 64 * 4  # inputs and outputs of every window, in bytes
    cuda = torch.device("cuda", 0)
    fake_free_memory(monkeypatch, 2 * need + 2)
    assert pipeline._activation_device(model, nsamples, seqlen, cuda) == cuda
    fake_free_memory(monkeypatch, 2 * need)
    assert pipeline._activation_device(model, nsamples, seqlen, cuda) == torch.device("cpu")
    cpu = torch.device("cpu")
    assert pipeline._activation_device(model, nsamples, seqlen, cpu) == cpu


@CUDA
def test_offloaded_activations_give_the_same_model(calib_tokens, monkeypatch):
    cfg = preset(CONF / "quant" / "sign.yaml")
    ref, _, where = quantized_tiny("tiny-llama", cfg, "cuda", calib_tokens)
    assert where == [("cuda", "cuda")] * 2
    fake_free_memory(monkeypatch, 1 << 16)  # 64 KiB free < 2 x the 64 KiB of activations
    got, _, where = quantized_tiny("tiny-llama", cfg, "cuda", calib_tokens)
    assert where == [("cuda", "cpu")] * 2  # layer on the GPU, activations on the CPU
    ids = calib_tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=OFFLOAD_ATOL)

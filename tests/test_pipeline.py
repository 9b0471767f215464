"""Layer-wise calibration on tiny random OPT and LLaMA."""
import pytest
import torch

from conftest import find_linears
from hbllm.config import QuantConfig
from hbllm.models import find_layers
from hbllm.pipeline import capture_inputs, layer_hessians, quantize_model, run_layer

CPU = torch.device("cpu")


def layerwise_output(model, tokens):
    """The last decoder layer's output, computed layer by layer from captured inputs."""
    _, layers = find_layers(model)
    inputs = capture_inputs(model, tokens, CPU)
    hidden = inputs.hidden
    for layer, kwargs in zip(layers, inputs.kwargs):
        hidden = run_layer(layer, hidden, kwargs, CPU)
    return torch.cat(hidden)


def model_output(model, tokens):
    """The last decoder layer's output in a plain model forward (one window at a time)."""
    _, layers = find_layers(model)
    outs = []
    handle = layers[-1].register_forward_hook(
        lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for w in tokens:
            model(w.unsqueeze(0))
    handle.remove()
    return torch.cat(outs)


def test_layerwise_forward_equals_model_forward(tiny_model, calib_tokens):
    model, _ = tiny_model
    torch.testing.assert_close(layerwise_output(model, calib_tokens),
                               model_output(model, calib_tokens), rtol=0, atol=1e-6)


def test_hessian_equals_direct_xtx(tiny_model, calib_tokens):
    model, _ = tiny_model
    _, layers = find_layers(model)
    inputs = capture_inputs(model, calib_tokens, CPU)
    layer = layers[0]
    seen = {}
    handles = [lin.register_forward_hook(
        lambda m, i, o, n=name: seen.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1])))
        for name, lin in find_linears(layer).items()]
    with torch.no_grad():
        run_layer(layer, inputs.hidden, inputs.kwargs[0], CPU)
    for h in handles:
        h.remove()
    hessians, tokens = layer_hessians(layer, inputs.hidden, inputs.kwargs[0], CPU)
    assert set(tokens.values()) == {calib_tokens.numel()}
    assert set(hessians) == set(find_linears(layer))
    for name, H in hessians.items():
        X = torch.cat(seen[name]).double()
        assert X.shape[0] == calib_tokens.numel()
        direct = 2 / X.shape[0] * X.T @ X
        assert H.dtype == torch.float32
        torch.testing.assert_close(H.double(), direct, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["sign", "hbllm"])
def test_every_decoder_linear_is_quantized_and_nothing_else(tiny_model, calib_tokens, method):
    model, _ = tiny_model
    before = {n: t.clone() for n, t in model.state_dict().items()}
    prefix, layers = find_layers(model)
    linear_weights = {f"{prefix}.{i}.{name}.weight"
                      for i, layer in enumerate(layers) for name in find_linears(layer)}
    records = []
    stats = quantize_model(model, calib_tokens, QuantConfig(method=method, blocksize=16),
                           CPU, on_layer=records.append)
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == linear_weights
    assert all(after[n].dtype == before[n].dtype for n in linear_weights)
    assert model.lm_head.weight.data_ptr() == after["lm_head.weight"].data_ptr()
    assert [r["index"] for r in records] == [0, 1] == [r["index"] for r in stats.layers]
    for r in stats.layers:
        assert set(r["linears"]) == set(find_linears(layers[0]))
        assert r["loss"] == pytest.approx(sum(v["loss"] for v in r["linears"].values()))
        assert r["loss"] > 0 and r["time_s"] > 0
    # numel-weighted over every linear (each linear's bits: tests/test_bits.py)
    numel = {(i, n): lin.weight.numel() for i, layer in enumerate(layers)
             for n, lin in find_linears(layer).items()}
    for kind in ("paper", "full"):
        weighted = sum(r["linears"][n][f"bits_{kind}"] * numel[r["index"], n]
                       for r in stats.layers for n in r["linears"]) / sum(numel.values())
        assert stats.bits[kind] == pytest.approx(weighted, rel=1e-12)
    if method == "sign":  # per row of a 16-column block: 16 signs + fp16 mean and scale
        assert (stats.bits["paper"], stats.bits["full"]) == (1.0, pytest.approx((16 + 32) / 16))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_fp16_quant_leaves_logits_bit_identical(tiny_model, calib_tokens):
    model, _ = tiny_model
    ids = calib_tokens[:2]
    with torch.no_grad():
        ref = model(ids).logits
    stats = quantize_model(model, calib_tokens, QuantConfig(method="none"), CPU)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert stats.layers == [] and stats.bits == {"paper": 32.0, "full": 32.0}


def test_tied_embeddings_stay_tied(calib_tokens):
    from conftest import compose
    from hbllm.config import validate
    from hbllm.models import load_model

    cfg = validate(compose("model=tiny-llama", "model.config.tie_word_embeddings=true"))
    model = load_model(cfg.model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    emb = model.lm_head.weight.detach().clone()
    quantize_model(model, calib_tokens, QuantConfig(method="sign"), CPU)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, emb)


def test_only_selected_layers_are_quantized(calib_tokens):
    from conftest import tiny

    model, _ = tiny("tiny-opt")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    stats = quantize_model(model, calib_tokens, QuantConfig(method="sign"), CPU, only=[1])
    changed = {n for n, t in model.state_dict().items() if not torch.equal(before[n], t)}
    assert changed and all(n.startswith("model.decoder.layers.1.") for n in changed)
    assert [r["index"] for r in stats.layers] == [1]

"""Model loading and generic discovery of decoder layers / linears."""
import time

import pytest
import torch
from torch import nn

from conftest import find_linears
from hbllm.config import ModelConfig
from hbllm.models import ModelUnavailable, byte_tokenizer, find_layers, load_model, load_tokenizer

EXPECTED = {
    "tiny-llama": ("model.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                    "mlp.down_proj"}),
    "tiny-opt": ("model.decoder.layers", {"self_attn.q_proj", "self_attn.k_proj",
                                          "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}),
}


def test_finds_decoder_layers_and_linears(tiny_model):
    model, cfg = tiny_model
    name, layers = find_layers(model)
    want_name, want_linears = EXPECTED[cfg.model.name]
    assert name == want_name and len(layers) == 2
    for layer in layers:
        assert set(find_linears(layer)) == want_linears
    # lm_head is a linear of the model but not of any decoder layer
    all_layer_linears = {id(m) for layer in layers for m in find_linears(layer).values()}
    assert id(model.lm_head) not in all_layer_linears


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype(dtype):
    from conftest import tiny

    model, _ = tiny("tiny-llama", dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert model.config.use_cache is False and not model.training


def test_random_init_is_seeded():
    from conftest import tiny

    a, _ = tiny("tiny-opt")
    b, _ = tiny("tiny-opt")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    text = "Größe — naïve ☃ test"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 256


def test_unknown_hub_id_offline_fails_fast():
    cfg = ModelConfig(name="x", path="no-such-org/no-such-model-hbllm")
    t = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="offline"):
        load_model(cfg)
    with pytest.raises(ModelUnavailable, match="offline"):
        load_tokenizer(cfg)
    assert time.perf_counter() - t < 20


def test_missing_local_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelUnavailable, match="no such local directory"):
        load_model(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ModelUnavailable, match="GGUF file"):
        load_model(ModelConfig(path=str(tmp_path / "nope.gguf")))
    with pytest.raises(ModelUnavailable, match="pip install"):
        load_model(ModelConfig(path="pip:no_such_package_hbllm"))


def test_local_directory_round_trip(tmp_path):
    from conftest import tiny

    model, cfg = tiny("tiny-llama")
    model.save_pretrained(tmp_path)
    again = load_model(ModelConfig(path=str(tmp_path), dtype="float32"))
    ids = torch.arange(20).unsqueeze(0)
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_find_layers_needs_a_layer_list():
    with pytest.raises(ValueError, match="ModuleList"):
        find_layers(nn.Sequential(nn.Linear(2, 2)))

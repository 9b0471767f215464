"""Packed checkpoint of a tiny random llama quantized with HBLLM: sizes, round trip, generation."""
import json

import pytest
import torch
from safetensors.torch import load_file

import hbllm
from hbllm.config import QuantConfig
from hbllm.packed.io import compress, load_packed, pack
from hbllm.packed.module import PackedLinear

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def quantize_tiny(model, quant, compressed=False):
    """Quantize every decoder linear with a random Hessian; returns ({name: codes}, {name: bits})
    where codes are the quantizer's or, if ``compressed``, already packed by ``compress``."""
    codes, bits = {}, {}
    gen = torch.Generator().manual_seed(1)
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            x = torch.randn(512, mod.in_features, generator=gen)
            res = hbllm.quantize_weight(mod.weight.data, 2 / 512 * x.T @ x, quant, return_codes=True)
            mod.weight.data.copy_(res.weight)
            full = f"model.layers.{name}"
            c = compress(res.codes, *mod.weight.shape, quant) if compressed else res.codes
            codes[full], bits[full] = c, (res.bits["full"], res.numel)
    return codes, bits


@pytest.fixture(scope="module", params=[("row", False), ("col", True)], ids=["row", "col_shared"])
def packed_tiny(request, tmp_path_factory):
    layout, shared = request.param
    quant = QuantConfig(method="hbllm", layout=layout, shared_mean=shared, blocksize=64)
    model = tiny_llama()
    codes, bits = quantize_tiny(model, quant, compressed=(layout == "col"))
    out = tmp_path_factory.mktemp(f"packed_{layout}")
    report = pack(model, out, codes=codes, quant=quant)
    return model, out, report, bits


def test_bytes_match_full_accounting(packed_tiny):
    _, out, report, bits = packed_tiny
    full = sum(b * n for b, n in bits.values()) / sum(n for _, n in bits.values())
    assert report["weights"] == sum(n for _, n in bits.values())
    assert abs(report["bits_per_weight"] - full) / full < 0.01, (report, full)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 1 and len(manifest["linears"]) == 14


def test_load_computes_like_fake_quant_and_generates_same(packed_tiny):
    model, out, _, _ = packed_tiny
    loaded = load_packed(out)
    packed = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 14
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.model.layers.modules())
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 2e-3
    prompt = ids[:1, :5]
    a = model.generate(prompt, max_new_tokens=20, do_sample=False)
    b = loaded.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(a, b)


def test_save_load_roundtrip_exact(packed_tiny, tmp_path):
    _, out, report, _ = packed_tiny
    loaded = load_packed(out)
    again = pack(loaded, tmp_path)
    assert again["linear_bytes"] == report["linear_bytes"]
    for name in ("linears.safetensors", "rest.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(tmp_path / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_pack_rejects_missing_quant_and_unknown_names(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="nothing to pack"):
        pack(model, tmp_path)
    with pytest.raises(KeyError, match="does not have"):
        pack(model, tmp_path, codes={"model.nope": []})
    with pytest.raises(FileNotFoundError, match="hbllm.pack"):
        load_packed(tmp_path / "missing")


def test_gemma3_text_roundtrip(tmp_path):
    """Gemma-3 (scaled embeddings, two rotary tables, tied head) loads back and computes the same."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=64,
                                        max_position_embeddings=64, sliding_window=8)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    quant = QuantConfig(method="hbllm", layout="row", blocksize=64)
    codes, _ = quantize_tiny(model, quant)
    pack(model, tmp_path, codes=codes, quant=quant)
    loaded = load_packed(tmp_path)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 2e-3
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

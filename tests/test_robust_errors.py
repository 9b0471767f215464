"""Errors that name the file and the fix (issue 12): corrupt config.json, binary or non-UTF-8
calibration text, truncated GGUF, corrupt results.json, a packed manifest that does not match,
a packed file with flipped bytes."""
import json
import shutil

import pytest

from conftest import compose, tiny
from hbllm import app
from hbllm.config import ModelConfig
from hbllm.data import DataUnavailable
from hbllm.models import ModelUnavailable, load_model, load_tokenizer
from hbllm.results import CorruptResults
from test_app import TINY


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from hbllm.models import byte_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    model, _ = tiny("tiny-llama")
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_corrupt_config_json_is_named_not_blamed_on_the_hub(model_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 6')
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelUnavailable) as err:
            load(ModelConfig(path=str(bad)))
        msg = str(err.value)
        assert str(bad / "config.json") in msg and "not valid JSON" in msg
        assert "hub" not in msg


def test_a_local_directory_that_fails_to_load_is_not_blamed_on_the_hub(model_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailable) as err:
        load_model(ModelConfig(path=str(bad)))
    assert f"local directory {bad}" in str(err.value) and "hub" not in str(err.value)


@pytest.mark.parametrize("content,what", [(b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "binary file"),
                                          ("caf\u00e9 au lait".encode("latin1"), "not UTF-8")])
def test_binary_or_non_utf8_calibration_file_is_named(tmp_path, content, what):
    from hbllm.data.streams import read_text_files

    good = tmp_path / "good.txt"
    good.write_text("plain text\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine start\n" * 3 + content)
    with pytest.raises(DataUnavailable, match=f"calib.files: {bad} is (a )?{what}"):
        read_text_files([str(good), str(bad)], "calib.files")


def test_truncated_gguf_names_the_file(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00\x05")  # header cut inside the tensor count
    with pytest.raises(ModelUnavailable, match=f"{gguf} .*truncated or corrupt; download it"):
        load_model(ModelConfig(path=str(gguf)))


def test_corrupt_results_json_names_the_file(tmp_path):
    (tmp_path / "results.json").write_text('{"status": "do')
    with pytest.raises(CorruptResults, match=f"{tmp_path / 'results.json'} is not valid JSON.*mv"):
        app.run(compose(*TINY), tmp_path)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    import torch

    import hbllm
    from hbllm.config import QuantConfig
    from hbllm.packed import compress, pack

    model, _ = tiny("tiny-llama")
    quant = QuantConfig(blocksize=64)
    codes = {}
    gen = torch.Generator().manual_seed(1)
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            x = torch.randn(256, mod.in_features, generator=gen)
            res = hbllm.quantize_weight(mod.weight.data, x.T @ x / 128, quant, return_codes=True)
            codes[f"model.layers.{name}"] = compress(res.codes, *mod.weight.shape, quant)
    out = tmp_path_factory.mktemp("packed")
    pack(model, out, codes=codes, quant=quant)
    return out


def test_packed_manifest_carries_checksums_verified_at_load(packed_dir, tmp_path):
    from hbllm.packed import load_packed

    manifest = json.loads((packed_dir / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"linears.safetensors", "rest.safetensors"}
    load_packed(packed_dir)  # intact: loads
    bad = tmp_path / "p"
    shutil.copytree(packed_dir, bad)
    data = bytearray((bad / "linears.safetensors").read_bytes())
    data[-7] ^= 0xFF  # one flipped byte in the tensor payload
    (bad / "linears.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"linears\.safetensors: SHA-256 .* differs .*corrupt"):
        load_packed(bad)


def test_wrong_shape_in_packed_manifest_is_named(packed_dir, tmp_path):
    from hbllm.packed import load_packed

    bad = tmp_path / "p"
    shutil.copytree(packed_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    name = "model.layers.0.mlp.up_proj"
    manifest["linears"][name]["rows"] = 64
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"linear {name} is 64x64 in the manifest but 128x64"):
        load_packed(bad)

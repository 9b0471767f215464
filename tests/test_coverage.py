"""Coverage: every decoder weight counted as quantized or full precision, by kind; bits over the
whole decoder; unreachable weights fail the run by name; quant.skip; routers; the app's record."""
import json

import pytest
import torch
from torch import nn

from conftest import compose, tiny
from hbllm import app
from hbllm.config import QuantConfig
from hbllm.models import find_layers
from hbllm.pipeline import quantize_model

CPU = torch.device("cpu")


@pytest.fixture
def tokens():
    return torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))


def test_dense_model_is_fully_covered(tokens):
    model, _ = tiny("tiny-llama")
    _, layers = find_layers(model)
    matrices = sum(p.numel() for p in layers.parameters() if p.dim() == 2)
    norms = sum(p.numel() for p in layers.parameters() if p.dim() == 1)
    stats = quantize_model(model, tokens, QuantConfig(method="sign", blocksize=16), CPU)
    cov = stats.coverage
    assert cov["matrix_fraction"] == 1.0 and cov["left_full_precision"] == {}
    by = cov["by_kind"]
    assert by["attention"]["full_precision"] == by["mlp"]["full_precision"] == 0
    assert by["attention"]["quantized"] + by["mlp"]["quantized"] == matrices == cov["quantized"]
    assert by["other"] == {"quantized": 0, "full_precision": norms}
    # bits over the whole decoder: the norms count at their 32 bits
    for k in ("paper", "full"):
        want = (stats.bits[k] * matrices + 32 * norms) / (matrices + norms)
        assert stats.bits[f"decoder_{k}"] == pytest.approx(want)
    assert stats.bits["decoder_paper"] > stats.bits["paper"]


def test_only_some_layers_count_the_others_in_full_precision(tokens):
    model, _ = tiny("tiny-llama")
    _, layers = find_layers(model)
    stats = quantize_model(model, tokens, QuantConfig(method="sign"), CPU, only=[1])
    per_layer = sum(p.numel() for p in layers[1].parameters() if p.dim() == 2)
    assert stats.coverage["quantized"] == per_layer
    assert stats.coverage["matrix_fraction"] == pytest.approx(0.5)


class Unsupported(nn.Module):
    """A projection stored as a bare parameter: no layout hbllm knows."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.data.clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


def test_unreachable_weights_fail_with_their_names(tokens):
    model, _ = tiny("tiny-llama")
    _, layers = find_layers(model)
    layers[1].mlp.down_proj = Unsupported(layers[1].mlp.down_proj)
    before = layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\].*mlp\.down_proj\.weight \(64, 128\)"
                       r".*quant\.skip"):
        quantize_model(model, tokens, QuantConfig(method="sign"), CPU)
    assert torch.equal(layers[0].self_attn.q_proj.weight, before)  # failed before any work
    stats = quantize_model(model, tokens, QuantConfig(method="sign", skip=["mlp.down_proj"]), CPU)
    assert stats.coverage["left_full_precision"] == {"mlp.down_proj": "quant.skip mlp.down_proj"}
    assert stats.coverage["matrix_fraction"] < 1


def test_skip_patterns_leave_weights_in_full_precision(tokens):
    model, _ = tiny("tiny-mixtral")
    _, layers = find_layers(model)
    experts = layers[0].mlp.experts
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quant = QuantConfig(method="sign", skip=["*.experts.*", "self_attn.q_proj"])
    stats = quantize_model(model, tokens, quant, CPU)
    same = {n for n, p in model.named_parameters() if torch.equal(p, before[n])}
    assert {f"model.layers.{i}.{n}" for i in (0, 1) for n in
            ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "self_attn.q_proj.weight",
             "mlp.gate.weight")} <= same
    assert "model.layers.0.self_attn.k_proj.weight" not in same
    by = stats.coverage["by_kind"]
    assert by["experts"] == {"quantized": 0, "full_precision": 2 * (experts.gate_up_proj.numel()
                                                                    + experts.down_proj.numel())}
    assert by["attention"]["full_precision"] == 2 * 64 * 64
    left = stats.coverage["left_full_precision"]
    assert left["mlp.experts.2.up_proj"] == "quant.skip *.experts.*"


def test_routers_stay_full_precision_unless_asked(tokens):
    model, _ = tiny("tiny-mixtral")
    gate = model.model.layers[0].mlp.gate.weight
    kept = gate.detach().clone()
    stats = quantize_model(model, tokens, QuantConfig(method="sign"), CPU)
    assert torch.equal(gate, kept)
    assert stats.coverage["by_kind"]["router"] == {"quantized": 0, "full_precision": 2 * 4 * 64}
    stats = quantize_model(model, tokens, QuantConfig(method="sign", quantize_routers=True), CPU)
    assert not torch.equal(gate, kept)
    assert stats.coverage["by_kind"]["router"] == {"quantized": 2 * 4 * 64, "full_precision": 0}
    assert "mlp.gate" in stats.layers[0]["linears"]


TINY_RUN = ["quant=hbllm_row", "quant.blocksize=32", "calib=text_files", "calib.nsamples=4",
            "calib.seqlen=32", "eval.datasets=[text_files]", "eval.seqlen=32",
            "eval.max_windows=2", "logger=disabled"]


def _files():
    from conftest import REPO

    src = sorted((REPO / "hbllm").glob("*.py"))
    return [f"calib.files=[{src[0]}]", f"data.eval_files=[{src[1]}]"]


@pytest.mark.parametrize("kind", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v2"])
def test_app_quantizes_every_expert_and_attention_weight(kind, tmp_path):
    results = app.run(compose(f"model={kind}", *TINY_RUN, *_files()), tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    cov = stored["coverage"]
    model, _ = tiny(kind)
    _, layers = find_layers(model)
    experts = sum(p.numel() for n, p in layers.named_parameters() if ".experts." in n)
    attention = sum(p.numel() for n, p in layers.named_parameters()
                    if "self_attn" in n and p.dim() == 2)
    assert cov["by_kind"]["experts"] == {"quantized": experts, "full_precision": 0}
    assert cov["by_kind"]["attention"] == {"quantized": attention, "full_precision": 0}
    assert cov["by_kind"]["mlp"]["full_precision"] == 0
    assert set(cov["left_full_precision"].values()) == {"router (quant.quantize_routers=false)"}
    assert 0.98 < cov["matrix_fraction"] < 1
    assert stored["bits"]["paper"] < stored["bits"]["decoder_paper"]
    moe = stored["layers"][-1]["experts"]
    assert len(moe) == model.config.get_text_config().to_dict().get(
        "num_local_experts", getattr(model.config, "num_experts", None)
        or getattr(model.config, "n_routed_experts", None))
    assert sum(r["tokens"] for r in moe.values()) == 4 * 32 * 2
    assert "decoder matrices quantized" in app.format_table(results)


def test_save_packed_refuses_experts_and_packs_the_dense_parts(tmp_path):
    import hbllm

    with pytest.raises(ValueError, match="cannot pack MoE experts.*quant.skip"):
        app.run(compose("model=tiny-mixtral", *TINY_RUN, *_files(), "quant.blocksize=64",
                        "save_packed=true"), tmp_path / "refused")
    results = app.run(compose("model=tiny-mixtral", *TINY_RUN, *_files(), "quant.blocksize=64",
                              "save_packed=true", "quant.skip=[*.experts.*]"), tmp_path / "dense")
    assert results["packed"]["linears"] == 8  # q, k, v, o of two layers
    model = hbllm.load_packed(tmp_path / "dense" / "packed")
    x = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()


def test_wandb_summary_has_coverage_and_decoder_bits(tokens):
    model, _ = tiny("tiny-qwen2-moe")
    stats = quantize_model(model, tokens, QuantConfig(method="sign"), CPU)
    summary = app._final_summary({"bits": stats.bits, "coverage": stats.coverage})
    assert summary["coverage/matrix_fraction"] == stats.coverage["matrix_fraction"] < 1
    assert summary["coverage/experts/full_precision"] == 0
    assert summary["coverage/router/full_precision"] == 2 * (8 * 64 + 64)  # gate + shared gate
    assert summary["bits/decoder_paper"] > summary["bits/paper"]

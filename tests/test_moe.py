"""MoE layers on tiny random Mixtral, Qwen2/3-MoE, DeepSeek-V2 and GPT-OSS: expert weights found
in the fused tensors, per-expert Hessians over exactly the routed tokens, sparse experts,
write-back, save and reload."""
import pytest
import torch
from torch import nn

from conftest import tiny
from hbllm.config import QuantConfig
from hbllm.models import find_layers
from hbllm.moe import fill_sparse_experts, find_fused_experts
from hbllm.pipeline import capture_inputs, quantize_model, run_layer
from hbllm.weights import collect_hessians, fill_sparse_expert_hessians, quantizable_weights

CPU = torch.device("cpu")
MOE = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-deepseek-v2", "tiny-gpt-oss"]


@pytest.fixture
def tokens():
    return torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))


def moe_layer(model):
    """The last decoder layer (an MoE layer in every tiny MoE preset) and its fused experts."""
    _, layers = find_layers(model)
    (name, experts), = find_fused_experts(layers[-1]).items()
    return layers[-1], name, experts


def expert_matrix(experts, param, e):
    """Expert e's (out, in) matrix of a fused parameter, written independently of hbllm."""
    return param.data[e].T if experts.is_transposed else param.data[e]


@pytest.mark.parametrize("kind", MOE)
def test_expert_weights_partition_the_fused_tensors(kind):
    model, _ = tiny(kind)
    layer, name, experts = moe_layer(model)
    weights = [w for w in quantizable_weights(layer) if w.kind == "experts"]
    E = experts.num_experts
    assert len(weights) == 3 * E
    assert {w.name for w in weights} == {f"{name}.{e}.{m}" for e in range(E)
                                         for m in ("gate_proj", "up_proj", "down_proj")}
    # every element of the fused parameters belongs to exactly one expert matrix
    for p in (experts.gate_up_proj, experts.down_proj):
        p.data.zero_()
    for w in weights:
        w.set(w.get() + 1)
    assert torch.equal(experts.gate_up_proj.data, torch.ones_like(experts.gate_up_proj))
    assert torch.equal(experts.down_proj.data, torch.ones_like(experts.down_proj))
    # (out, in) orientation and gate rows: interleaved for GPT-OSS, [gate; up] otherwise
    inter = experts.down_proj.shape[1 if experts.is_transposed else 2]
    gate = next(w for w in weights if w.name == f"{name}.1.gate_proj")
    up = next(w for w in weights if w.name == f"{name}.1.up_proj")
    down = next(w for w in weights if w.name == f"{name}.1.down_proj")
    assert tuple(gate.get().shape) == (inter, model.config.hidden_size)
    assert tuple(down.get().shape) == (model.config.hidden_size, inter)
    torch.nn.init.normal_(experts.gate_up_proj)
    full = expert_matrix(experts, experts.gate_up_proj, 1)
    rows = (slice(0, None, 2), slice(1, None, 2)) if not experts.is_concatenated \
        else (slice(0, inter), slice(inter, 2 * inter))
    assert torch.equal(gate.get(), full[rows[0]]) and torch.equal(up.get(), full[rows[1]])


@pytest.mark.parametrize("kind", MOE)
def test_zeroing_the_gate_matrices_silences_the_experts(kind):
    """The matrices named gate_proj are those the model's gate function reads."""
    model, _ = tiny(kind)
    layer, _, experts = moe_layer(model)
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        if hasattr(experts, name):
            getattr(experts, name).data.zero_()
    x = torch.randn(10, model.config.hidden_size)
    index = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    with torch.no_grad():
        assert experts(x, index, weights).abs().sum() > 0
        for w in quantizable_weights(layer):
            if w.name.endswith("gate_proj") and w.kind == "experts":
                w.set(torch.zeros_like(w.get()))
        assert experts(x, index, weights).abs().max() == 0


def hand_routed_hessians(layer, experts, router, X):
    """Per expert: (token count, H_in, H_mid) from a routing computed by hand: the top-k of
    ``X @ router.weight^T (+ bias)``, then the expert's matrices applied to its tokens."""
    logits = X.double() @ router.weight.double().T
    if getattr(router, "bias", None) is not None:
        logits = logits + router.bias.double()
    chosen = logits.topk(experts.top_k if hasattr(experts, "top_k") else 2, dim=-1).indices
    out = []
    for e in range(experts.num_experts):
        Xe = X[(chosen == e).any(-1)]
        W = expert_matrix(experts, experts.gate_up_proj, e)
        b = experts.gate_up_proj_bias[e] if experts.has_bias else 0
        mid = experts._apply_gate(Xe @ W.T + b)
        n = Xe.shape[0]
        Hin = 2 / n * Xe.double().T @ Xe.double() if n else torch.zeros(X.shape[1], X.shape[1])
        Hmid = 2 / n * mid.double().T @ mid.double() if n else None
        out.append((n, Hin, Hmid))
    return out


@pytest.mark.parametrize("kind", MOE)
def test_each_expert_hessian_holds_exactly_its_routed_tokens(kind, tokens):
    model, _ = tiny(kind)
    _, layers = find_layers(model)
    inputs = capture_inputs(model, tokens, CPU)
    hidden = inputs.hidden
    for layer, kwargs in zip(layers[:-1], inputs.kwargs):
        hidden = run_layer(layer, hidden, kwargs, CPU)
    layer, name, experts = moe_layer(model)
    kwargs = inputs.kwargs[-1]
    block = dict(layer.named_modules())[name.rpartition(".")[0]]
    router = next(m for n, m in block.named_children() if n in ("gate", "router"))
    seen = []
    handle = block.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    weights = quantizable_weights(layer)
    with torch.no_grad():
        hessians, counts = collect_hessians(layer, weights,
                                            lambda: run_layer(layer, hidden, kwargs, CPU))
    handle.remove()
    X = torch.cat(seen)
    assert X.shape[0] == tokens.numel()
    with torch.no_grad():
        want = hand_routed_hessians(layer, experts, router, X)
    assert sum(n for n, _, _ in want) == tokens.numel() * 2  # top-2 routing
    for e, (n, Hin, Hmid) in enumerate(want):
        assert counts[f"{name}.{e}:in"] == counts[f"{name}.{e}:mid"] == n
        if n:
            torch.testing.assert_close(hessians[f"{name}.{e}:in"].double(), Hin,
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(hessians[f"{name}.{e}:mid"].double(), Hmid,
                                       rtol=1e-4, atol=1e-5)


def test_sparse_experts_get_the_layer_mean_or_the_identity():
    H = [torch.full((3, 3), float(v)) for v in (1, 2, 4)]
    assert fill_sparse_experts(H, [5, 0, 20], min_tokens=10) == ["layer_mean", "layer_mean", "own"]
    mean = (5 * 1 + 20 * 4) / 25
    assert torch.allclose(H[0], torch.full((3, 3), mean)) and torch.allclose(H[1], H[0])
    assert torch.equal(H[2], torch.full((3, 3), 4.0))
    H = [torch.zeros(3, 3), torch.zeros(3, 3)]
    assert fill_sparse_experts(H, [0, 0], min_tokens=1) == ["identity", "identity"]
    assert torch.equal(H[0], torch.eye(3))


def test_an_expert_the_router_never_picks_is_quantized_from_the_layer_mean(tokens):
    model, _ = tiny("tiny-mixtral")
    layer, name, experts = moe_layer(model)

    def never_expert_3(module, args, out):  # the router picks the top 2 of experts 0-2
        logits = out[0].masked_fill(torch.arange(4) == 3, -torch.inf)
        values, index = logits.softmax(-1).topk(2, dim=-1)
        return logits, values / values.sum(-1, keepdim=True), index
    layer.mlp.gate.register_forward_hook(never_expert_3)
    before = experts.down_proj.data[3].clone()
    stats = quantize_model(model, tokens, QuantConfig(method="sign", expert_min_tokens=1), CPU)
    rec = stats.layers[-1]["experts"]
    assert rec[f"{name}.3"] == {"tokens": 0, "hessian": "layer_mean"}
    assert all(rec[f"{name}.{e}"]["hessian"] == "own" and rec[f"{name}.{e}"]["tokens"] > 0
               for e in range(3))
    assert sum(r["tokens"] for r in rec.values()) == 2 * tokens.numel()
    after = experts.down_proj.data[3]
    # quantized (sign: two values per row, m +- a), not zeroed as a Hessian of zeros makes it
    assert after.abs().min() > 0 and not torch.equal(after, before)
    assert all(len(row.unique()) == 2 for row in after)


@pytest.mark.parametrize("kind", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v2"])
def test_quantized_logits_equal_a_dequantize_and_run_reference(kind, tokens, monkeypatch):
    """Each quantized matrix, written into a fresh copy of the model by hand (gate and up
    concatenated into the fused tensor), gives the quantized model's logits."""
    import hbllm

    model, _ = tiny(kind)
    reference, _ = tiny(kind)
    results = []
    real = hbllm.quantize_weight

    def recording(W, H, cfg, **kw):
        res = real(W, H, cfg, **kw)
        results.append(res.weight.clone())
        return res
    monkeypatch.setattr(hbllm, "quantize_weight", recording)
    stats = quantize_model(model, tokens, QuantConfig(method="hbllm", blocksize=16), CPU)
    names = [(i, n) for i, r in enumerate(stats.layers) for n in r["linears"]]
    assert len(names) == len(results)
    deq = dict(zip(names, results))
    _, ref_layers = find_layers(reference)
    for i, layer in enumerate(ref_layers):
        modules = dict(layer.named_modules())
        for ename, experts in find_fused_experts(layer).items():
            for e in range(experts.num_experts):
                g, u, d = (deq.pop((i, f"{ename}.{e}.{m}"))
                           for m in ("gate_proj", "up_proj", "down_proj"))
                experts.gate_up_proj.data[e] = torch.cat([g, u])
                experts.down_proj.data[e] = d
        for (j, n) in [k for k in deq if k[0] == i]:
            modules[n].weight.data.copy_(deq.pop((j, n)))
    assert not deq
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tiny-qwen2-moe", "tiny-gpt-oss"])
def test_quantized_moe_saves_and_reloads(kind, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = tiny(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = quantize_model(model, tokens, QuantConfig(method="sign"), CPU)
    assert stats.coverage["by_kind"]["experts"]["full_precision"] == 0
    assert stats.coverage["matrix_fraction"] > 0.98  # all but the routers
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in before if n.endswith(("experts.gate_up_proj", "experts.down_proj"))} \
        <= changed
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, again(tokens).logits)


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


class PerExpertLinears(nn.Module):
    """An MoE block with one nn.Linear per expert matrix (the older layout), top-1 routed."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 3, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(3))

    def forward(self, x):
        choice = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            if (choice == e).any():
                out[choice == e] = expert(x[choice == e])
        return out


def test_per_expert_linears_are_experts_with_their_routed_tokens():
    torch.manual_seed(0)
    block = PerExpertLinears()
    w = block.gate.weight.data
    w[1], w[2] = -w[0], 0  # logits (s, -s, 0): expert 2 never wins
    x = torch.randn(50, 8)
    weights = quantizable_weights(block)
    assert {w.name: w.kind for w in weights} == {
        "gate": "router", **{f"experts.{e}.w{i}": "experts" for e in range(3) for i in (1, 2)}}
    hessians, counts = collect_hessians(block, weights, lambda: block(x))
    choice = block.gate(x).argmax(-1)
    n = [int((choice == e).sum()) for e in range(3)]
    assert n[0] > 0 and n[1] > 0 and n[2] == 0
    for e in range(3):
        assert counts[f"experts.{e}.w1"] == counts[f"experts.{e}.w2"] == n[e]
    assert counts["gate"] == 50
    H0, H1 = hessians["experts.0.w1"].clone(), hessians["experts.1.w1"].clone()
    record = fill_sparse_expert_hessians(weights, hessians, counts, min_tokens=1)
    assert record == {"experts.0": {"tokens": n[0], "hessian": "own"},
                      "experts.1": {"tokens": n[1], "hessian": "own"},
                      "experts.2": {"tokens": 0, "hessian": "layer_mean"}}
    torch.testing.assert_close(hessians["experts.2.w1"], (n[0] * H0 + n[1] * H1) / (n[0] + n[1]))
    X = x[choice == 1]
    torch.testing.assert_close(H1, 2 / n[1] * X.T @ X)

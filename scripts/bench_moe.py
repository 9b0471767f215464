"""Cost of calibrating and quantizing one MoE decoder layer at real sizes (random weights).

    python scripts/bench_moe.py --arch qwen3-30b-a3b [--nsamples 128] [--seqlen 2048] [--json out.json]
    python scripts/bench_moe.py --arch mixtral-8x7b --scale 16 --nsamples 4 --seqlen 64   # CPU smoke

Builds a 1-layer model with the architecture's real layer dimensions (``--scale`` divides the
widths), random bfloat16/float32 weights, and random calibration tokens; runs
:func:`hbllm.pipeline.quantize_model` on the accelerator and reports the seconds spent, the peak
accelerator memory, the per-expert routed-token counts and the layer's coverage. The real
checkpoints are not needed (the hub is not reachable from the benchmark machine); routing of a
random router is more even than a trained one's.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

# one decoder layer of each preset (hbllm/conf/model/*.yaml), widths from the public configs
ARCHS = {
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_attention_heads=16,
                             num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
                             num_experts_per_tok=6, first_k_dense_replace=0, kv_lora_rank=512,
                             q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
                             v_head_dim=128, n_group=1, topk_group=1),
}
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "kv_lora_rank")


def build(arch: str, scale: int, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(ARCHS[arch], vocab_size=1024, num_hidden_layers=1, max_position_embeddings=4096,
               tie_word_embeddings=False)
    for k in WIDTHS:
        if k in cfg:
            cfg[k] //= scale
    if scale > 1 and "head_dim" in cfg:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype).eval()


def main() -> None:
    from hbllm.config import QuantConfig
    from hbllm.pipeline import quantize_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--scale", type=int, default=1, help="divide the layer widths (smoke runs)")
    ap.add_argument("--method", default="hbllm")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.arch, args.scale, dtype)
    model.config.use_cache = False
    tokens = torch.randint(0, 1024, (args.nsamples, args.seqlen),
                           generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    stats = quantize_model(model, tokens, QuantConfig(method=args.method), device)
    seconds = time.perf_counter() - t0
    experts = stats.layers[0].get("experts", {})
    counts = [r["tokens"] for r in experts.values()]
    out = {"arch": args.arch, "scale": args.scale, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "dtype": str(dtype), "seconds": seconds,
           "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9
           if device.type == "cuda" else None,
           "layer_params": sum(p.numel() for p in model.model.layers[0].parameters()),
           "quantized_matrices": len(stats.layers[0]["linears"]),
           "expert_tokens": {"min": min(counts), "max": max(counts),
                             "mean": sum(counts) / len(counts)} if counts else None,
           "coverage": stats.coverage["by_kind"], "bits": stats.bits}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

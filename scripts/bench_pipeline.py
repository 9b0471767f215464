"""End-to-end quantization time of a random LLaMA, from model build to saved checkpoint, with the
pipeline's stage breakdown (issue 12).

    python scripts/bench_pipeline.py                      # LLaMA-2-7B shape, 128 x 2048, HBLLM-row
    python scripts/bench_pipeline.py --shape tiny --device cpu   # seconds on a CPU

Stages: ``build`` (random weights drawn on the device, then moved to the CPU, as a loaded
checkpoint would sit), ``capture`` (first-layer inputs of every window), per layer ``move``,
``hessian`` (shared X^T X), ``quantize``, ``propagate``, ``store`` (the layer's weights to
``<out>/layers``, what a resume needs), and ``save`` (``save_pretrained``). Calibration tokens are
random (no dataset is read). Prints a table and writes ``<out>/bench.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
}


def build(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """A LLaMA with N(0, 0.02) weights (norms 1) drawn on ``device`` (fast on a GPU; the
    transformers initializer runs per module on the CPU), returned on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model = model.to("cpu")
    # non-persistent buffers (rotary inv_freq) were left uninitialized by to_empty: rebuild
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.config.use_cache = False
    return model.eval()


def main(argv=None) -> dict:
    from hbllm.config import QuantConfig
    from hbllm.layer_store import LayerStore
    from hbllm.pipeline import quantize_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (7b: 128)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per window (7b: 2048)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--method", default="hbllm")
    ap.add_argument("--layout", default="row")
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--wbits", type=int, default=None, help="rtn/gptq grid bits (the method's default)")
    ap.add_argument("--groupsize", type=int, default=None, help="rtn/gptq/pbllm groups (the method's default)")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one, removed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    tiny = args.shape == "tiny"
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    nsamples = args.nsamples or (8 if tiny else 128)
    seqlen = args.seqlen or (128 if tiny else 2048)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    shutil.rmtree(out / "layers", ignore_errors=True)
    extra = {k: v for k, v in (("wbits", args.wbits), ("groupsize", args.groupsize)) if v is not None}
    quant = QuantConfig(method=args.method, layout=args.layout, blocksize=args.blocksize, **extra)

    t_all = time.perf_counter()
    t = time.perf_counter()
    model = build(shape, getattr(torch, args.dtype), device, args.seed)
    build_s = time.perf_counter() - t
    tokens = torch.randint(0, shape["vocab_size"], (nsamples, seqlen),
                           generator=torch.Generator().manual_seed(args.seed))
    stats = quantize_model(model, tokens, quant, device, store=LayerStore(out / "layers"))
    t = time.perf_counter()
    model.save_pretrained(out / "model")
    save_s = time.perf_counter() - t
    total_s = time.perf_counter() - t_all

    stages = {"build_s": build_s, **{k: v for k, v in stats.timing.items()}, "save_s": save_s}
    layers = stats.layers
    per_layer = {k: sum(r[k] for r in layers) / len(layers)
                 for k in ("hessian_s", "quantize_s", "propagate_s", "time_s")}
    report = {"shape": args.shape, **shape, "nsamples": nsamples, "seqlen": seqlen,
              "dtype": args.dtype, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "quant": quant.label, "blocksize": quant.blocksize, "stages_s": stages,
              "per_layer_mean_s": per_layer, "total_s": total_s, "bits": stats.bits,
              "torch": torch.__version__}
    print(f"{args.shape}-shaped LLaMA ({shape['num_hidden_layers']} layers), {quant.label}, "
          f"{nsamples} x {seqlen} tokens, {args.dtype} on {report['gpu'] or device}")
    for k, v in stages.items():
        print(f"  {k:<14} {v:9.2f} s")
    print("  per layer (mean): " + ", ".join(f"{k} {v:.3f} s" for k, v in per_layer.items()))
    print(f"  total          {total_s:9.2f} s (build to saved)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    if not args.out:
        shutil.rmtree(out)
    return report


if __name__ == "__main__":
    main()

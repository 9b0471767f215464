"""Time the quantizers on one LLaMA-2-7B decoder layer's seven linears (synthetic inputs).

Weights: heavy-tailed (Student-t, 3 dof) with a few large input columns. Hessian: ``2/N X^T X``
from correlated activations (low-rank mixing plus noise) with a few outlier channels.
Prints seconds per linear and peak GPU memory; ``--out`` writes the table as JSON.

    python scripts/bench_quantize.py --device cuda --out bench.json
    python scripts/bench_quantize.py --device cpu --scale 0.125 --linears q_proj   # quick CPU run
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from hbllm.config import QuantConfig
from hbllm.quant import quantize_weight

LLAMA7B_LINEARS = {  # name: (out_features, in_features)
    "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008),
}
METHODS = {
    "hbllm_row": dict(method="hbllm", layout="row"),
    "hbllm_col": dict(method="hbllm", layout="col"),
    "billm": dict(method="billm"),
}


def synthetic_inputs(rows: int, cols: int, tokens: int, device, seed: int = 0):
    """Heavy-tailed weight ``(rows, cols)`` and Hessian ``(cols, cols)`` from correlated
    activations with outlier channels."""
    torch.manual_seed(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    outlier_cols = torch.randperm(cols, generator=g)[: max(1, cols // 512)]
    w[:, outlier_cols] *= 4
    mix = torch.randn(64, cols, generator=g) / 8
    x = torch.randn(tokens, 64, generator=g) @ mix + torch.randn(tokens, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[: max(1, cols // 256)]] *= 20
    x = x.to(device)
    h = (2.0 / tokens) * (x.T @ x)
    return w.to(device), h


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--linears", nargs="+", default=list(LLAMA7B_LINEARS), choices=list(LLAMA7B_LINEARS))
    p.add_argument("--scale", type=float, default=1.0, help="shrink every dimension (quick CPU runs)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens for the Hessian")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--check-cpu", action="store_true",
                   help="first compare --device against CPU on a 512x1024 input, every method")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    info = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "scale": args.scale, "tokens": args.tokens, "results": []}
    print(f"device: {info['device']}  torch {torch.__version__}")
    if args.check_cpu:
        w, h = synthetic_inputs(512, 1024, 2048, "cpu")
        for method, kw in METHODS.items():
            cfg = QuantConfig(**kw)
            ref, res = quantize_weight(w, h, cfg), quantize_weight(w.to(device), h.to(device), cfg)
            rel = float((res.weight.cpu() - ref.weight).norm() / ref.weight.norm())
            same = sum(a.tolist() == b.tolist() for a, b in zip(ref.salient, res.salient))
            print(f"check {method}: rel. diff vs cpu {rel:.2e}, same salient columns in "
                  f"{same}/{len(ref.salient)} blocks, loss {ref.loss:.4g} (cpu) {res.loss:.4g}")
    inputs = {}
    for name in args.linears:
        rows, cols = (max(128, int(round(d * args.scale / 128)) * 128) for d in LLAMA7B_LINEARS[name])
        inputs[name] = synthetic_inputs(rows, cols, args.tokens, device, seed=len(inputs))
    w, h = synthetic_inputs(256, 256, 512, device)  # warm-up (CUDA context, kernels)
    quantize_weight(w, h, QuantConfig(**METHODS["hbllm_row"]))
    print(f"{'method':<10} {'linear':<10} {'shape':>12} {'seconds':>8} {'peak GiB':>9} {'loss':>12} "
          f"{'bits':>5} {'full':>5}")
    for method in args.methods:
        cfg = QuantConfig(**METHODS[method])
        total = 0.0
        for name, (w, h) in inputs.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            tick = time.perf_counter()
            res = quantize_weight(w, h, cfg)
            sync(device)
            seconds = time.perf_counter() - tick
            total += seconds
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
            row = {"method": method, "linear": name, "shape": list(w.shape), "seconds": seconds,
                   "peak_gib": peak, "loss": res.loss, "bits_paper": res.bits["paper"],
                   "bits_full": res.bits["full"]}
            info["results"].append(row)
            print(f"{method:<10} {name:<10} {'x'.join(map(str, w.shape)):>12} {seconds:8.2f} {peak:9.2f} "
                  f"{res.loss:12.4g} {res.bits['paper']:5.3f} {res.bits['full']:5.3f}", flush=True)
        info["results"].append({"method": method, "linear": "TOTAL", "seconds": total})
        print(f"{method:<10} {'TOTAL':<10} {'':>12} {total:8.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()

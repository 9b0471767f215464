"""Ours against the authors' code on real (W, H) pairs of Gemma-3-270M: the fidelity table.

The pairs come from hbllm's own pipeline in the Gemma study's setting (``experiment=gemma3_study``:
32 windows x 256 tokens of wiki_sample with BOS; full-precision model, so layer i's inputs are
the unquantized model's): ``capture_inputs``, then ``layer_hessians`` on each chosen decoder
layer and ``run_layer`` to reach the next. They are cached in ``--pairs`` (float32), so a second
run skips the model. Each method then runs ours (``quantize_weight``) and the authors' code
(``scripts/bench_quantize.AuthorsCode`` from ``--authors-dir``, docs/quantizers.md says how to
get it) on the same W and H, float32 on CPU, and the output reconstruction error
``||(W-Q)L|| / ||WL||`` (L: Cholesky factor of H + 0.01 mean(diag H) I) of both is printed per
pair, then one summary row per method (the "Fidelity against the authors' code" table).

    python scripts/fidelity_authors.py --authors-dir build/authors --methods arbllm_x arbllm_rc
    python scripts/fidelity_authors.py --authors-dir build/authors --layers 0 --methods gptq_w3g128
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import METHODS, AuthorsCode, damped_cholesky, output_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY = ["experiment=gemma3_study", "quant=fp16", "logger.group=fidelity"]


@torch.no_grad()
def capture_pairs(layers, data_dir: str, overrides) -> dict:
    """``{"<layer>.<linear>": (W (out, in), H (in, in))}`` float32 for decoder ``layers``."""
    from hydra import compose, initialize_config_dir

    from hbllm.app import calibration_tokens  # (importing the app registers schema and resolvers)
    from hbllm.config import validate
    from hbllm.models import find_layers, load_model, load_tokenizer
    from hbllm.pipeline import capture_inputs, layer_hessians, run_layer
    from hbllm.weights import quantizable_weights

    with initialize_config_dir(config_dir=str(ROOT / "hbllm" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*STUDY, f"data.local_dir={data_dir}", *overrides])
    rc = validate(cfg)
    tok = load_tokenizer(rc.model)
    calib = calibration_tokens(rc, tok)
    print(f"calibration {tuple(calib.shape)}; loading {rc.model.name} ...", flush=True)
    model = load_model(rc.model, rc.seed).float()
    device = torch.device("cpu")
    inputs = capture_inputs(model, calib, device)
    _, blocks = find_layers(model)
    hidden, pairs = inputs.hidden, {}
    for i in range(max(layers) + 1):
        layer = blocks[i]
        if i in layers:
            weights = quantizable_weights(layer)
            hessians, _ = layer_hessians(layer, hidden, inputs.kwargs[i], device, weights)
            for qw in weights:
                pairs[f"{i}.{qw.name}"] = (qw.get().float().clone(),
                                           hessians[qw.hessian_key].float().clone())
            print(f"layer {i}: {', '.join(qw.name for qw in weights)}", flush=True)
        hidden = run_layer(layer, hidden, inputs.kwargs[i], device)
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors-dir", type=Path, required=True)
    p.add_argument("--methods", nargs="+", default=["arbllm_x", "arbllm_rc"], choices=list(METHODS))
    p.add_argument("--layers", nargs="+", type=int, default=[0, 8])
    p.add_argument("--linears", nargs="+", default=None,
                   help="only these linear names (q_proj ...)")
    p.add_argument("--pairs", type=Path, default=ROOT / "build" / "gemma3_pairs.pt",
                   help="cache of the captured pairs (git-ignored build/)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write every row as JSON here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the study setting")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cached = torch.load(args.pairs) if args.pairs.exists() else {}
    want = sorted(set(args.layers))
    if not all(any(k.startswith(f"{i}.") for k in cached) for i in want):
        cached.update(capture_pairs(want, args.data_dir, args.overrides))
        args.pairs.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cached, args.pairs)
    pairs = {k: v for k, v in cached.items() if int(k.split(".")[0]) in want
             and (args.linears is None or k.split(".")[-1] in args.linears)}
    authors = AuthorsCode(args.authors_dir)
    chols = {name: damped_cholesky(h) for name, (w, h) in pairs.items()}
    from hbllm.config import QuantConfig
    from hbllm.quant import quantize_weight

    rows = []
    print(f"{'method':<12} {'pair':<28} {'shape':>10} {'ours':>8} {'authors':>8} {'ratio-1':>9} "
          f"{'same Q':>6} {'|dQ|/|Q|':>9} {'ours s':>7} {'auth s':>7}")
    for method in args.methods:
        cfg = QuantConfig(**METHODS[method])
        if not authors.has(cfg.method):
            print(f"{method}: no authors' code in {args.authors_dir} (skipped)")
            continue
        for name, (w, h) in pairs.items():
            chol = chols[name]
            authors.prepare(cfg, h)
            t0 = time.perf_counter()
            ours = quantize_weight(w, h, cfg).weight
            t1 = time.perf_counter()
            theirs = authors.run(cfg, w, h)
            t2 = time.perf_counter()
            if theirs is None:
                print(f"{method}: the authors' code does not cover this setting (skipped)")
                break
            row = {"method": method, "pair": name, "shape": list(w.shape),
                   "ours": output_error(w, ours, chol), "authors": output_error(w, theirs, chol),
                   "same": bool(torch.equal(ours, theirs.to(ours.dtype))),
                   "q_diff": float((ours - theirs.to(ours.dtype)).norm() / theirs.norm()),
                   "ours_s": t1 - t0, "authors_s": t2 - t1}
            rows.append(row)
            print(f"{method:<12} {name:<28} {'x'.join(map(str, w.shape)):>10} {row['ours']:8.5f} "
                  f"{row['authors']:8.5f} {row['ours'] / row['authors'] - 1:+9.2e} "
                  f"{'yes' if row['same'] else 'no':>6} {row['q_diff']:9.1e} "
                  f"{row['ours_s']:7.2f} {row['authors_s']:7.2f}",
                  flush=True)
    print("\n| method | pairs | output error ours (mean, min-max) | authors (mean) | "
          "max \\|ours/authors - 1\\| | pairs with \\|Q_ours - Q_authors\\| / "
          "\\|Q_authors\\| < 1e-5 | bit-identical |\n|---|---|---|---|---|---|---|")
    for method in args.methods:
        r = [x for x in rows if x["method"] == method]
        if not r:
            continue
        ours = torch.tensor([x["ours"] for x in r])
        dev = max(abs(x["ours"] / x["authors"] - 1) for x in r)
        print(f"| {method} | {len(r)} | {ours.mean():.4f} ({ours.min():.4f}-{ours.max():.4f}) | "
              f"{sum(x['authors'] for x in r) / len(r):.4f} | {dev:.1e} | "
              f"{sum(x['q_diff'] < 1e-5 for x in r)}/{len(r)} | "
              f"{sum(x['same'] for x in r)}/{len(r)} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

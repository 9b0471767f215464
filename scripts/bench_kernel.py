"""Packed HBLLM linears vs fp16 cuBLAS on a CUDA GPU: correctness, latency, bandwidth, 7B decode.

    PYTHONPATH=$PWD python3 scripts/bench_kernel.py [--tune [lut mma cb tile mm]] [--json F] [--skip-7b]

For each LLaMA-2-7B linear shape (out x in) a random Gaussian weight is quantized with HBLLM
(row layout, random-activation Hessian) on the GPU and packed. Latencies are medians of CUDA-graph
replays over enough copies of the layer to exceed twice the L2 cache; bandwidth counts the packed
buffers (or the fp16 weight) plus input and output once, against the measured device-to-device
copy bandwidth. Every packed kernel (lookup-table GEMV, the two tensor-core GEMVs, Triton) is timed alone
at 1/4/8/16 tokens beside cuBLAS fp16; the fastest per (shape, tokens) becomes
``module.KERNEL_TABLE`` for the "auto" timing and the 7B run, and is printed as a Python literal
to record in hbllm/packed/module.py (``--tune``: the per-shape launch configs likewise, for
``cuda_lut.TUNED`` / ``cuda_mma.TUNED`` / ``cuda_codebook.TUNED`` / ``cuda_tile.TUNED``).
"packed GB/s" counts the
layer's registered (tiled) buffers; the codebook GEMV reads buffers of the same size. The
7B-shaped model has random fp16 weights; its 224 decoder linears are replaced by copies of the
three packed layers; decode is timed as one CUDA graph per step (static cache) and with eager
``generate``, and as one graph with the decoder linears replaced by free modules (the ceiling of
any linear kernel). Packed times are with programmatic dependent launch (``nvrtc.PDL``) and
again without.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
import time

import torch
import triton
from triton.testing import do_bench

import hbllm
from hbllm.config import QuantConfig
from hbllm.packed import cuda_codebook, cuda_lut, cuda_mma, cuda_tile, module, nvrtc, triton_kernels
from hbllm.packed.codes import dequantize, from_quantizer
from hbllm.packed.format import linear_meta, pack_linear, tensor_bytes
from hbllm.packed.module import PackedLinear

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
BATCHES = (1, 4, 8, 16)
TOL = 4e-3  # fp16 output vs float64 reference (tests/test_packed_triton.py)
LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    a = torch.randn(1 << 28, device="cuda", dtype=torch.float16)  # 512 MiB
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.nbytes / (t * 1e-3)


def quantize_shape(rows: int, cols: int, quant: QuantConfig, seed: int):
    """HBLLM-quantize a random (rows, cols) weight on the GPU; returns (LinearCodes, bits, s)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(rows, cols, device="cuda", generator=gen) * 0.02
    x = torch.randn(2048, cols, device="cuda", generator=gen)
    h = 2.0 / x.shape[0] * x.T @ x
    tick = time.perf_counter()
    res = hbllm.quantize_weight(w, h, quant, return_codes=True)
    torch.cuda.synchronize()
    codes = from_quantizer(res.codes, rows, cols, quant.blocksize, quant.layout, quant.haar_inverse)
    return codes, res.bits, time.perf_counter() - tick


def _capture(fn, times: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(times):
            fn()
    return graph


def graph_time_us(mods, x, target_ms: float = 4.0, replays: int = 21) -> float:
    """Median microseconds per call: one call on each module in turn, captured ``k`` times in one
    CUDA graph (``k`` so that a replay takes about ``target_ms``), replayed ``replays`` times."""
    def fn():
        for m in mods:
            m(x)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles, workspaces
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    one = _capture(fn, 1)
    one.replay()
    start.record()
    one.replay()
    end.record()
    torch.cuda.synchronize()
    k = max(1, math.ceil(target_ms / max(start.elapsed_time(end), 1e-3)))
    graph = _capture(fn, k)
    graph.replay()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del graph, one
    return 1e3 * statistics.median(times) / (k * len(mods))


def module_bytes(mod) -> int:
    if isinstance(mod, PackedLinear):
        return sum(b.numel() * b.element_size() for b in mod.buffers())
    return mod.weight.numel() * mod.weight.element_size()


def copies(make, nbytes: int, l2: int):
    return [make() for _ in range(max(2, math.ceil(2 * l2 / nbytes)))]


def fp16_copies(rows: int, cols: int, l2: int) -> list:
    """cuBLAS fp16 linears (out ``rows``, in ``cols``) over twice the L2 in weight bytes."""
    return copies(functools.partial(torch.nn.Linear, cols, rows, bias=False, device="cuda",
                                    dtype=torch.float16), rows * cols * 2, l2)


@contextlib.contextmanager
def plain_launches():
    """Within: no programmatic dependent launch (``nvrtc.PDL``), restored afterwards."""
    before, nvrtc.PDL = nvrtc.PDL, False
    try:
        yield
    finally:
        nvrtc.PDL = before


def set_kernel(mods, kernel: str) -> None:
    for m in mods:
        m.gemv = kernel


def packed_copies(codes, l2: int, kernel: str) -> list:
    """PackedLinears of ``codes`` (LinearCodes) on CUDA over twice the L2 in packed bytes,
    forced to ``kernel`` (one of ``module.KERNELS``)."""
    make = functools.partial(PackedLinear, pack_linear(codes), linear_meta(codes), device="cuda")
    mods = copies(make, module_bytes(make()), l2)
    set_kernel(mods, kernel)
    return mods


def tune(packs, l2: int, only=None) -> dict:
    """Per shape, the launch config of the lookup-table GEMV (1 token a launch), the +-1
    tensor-core GEMV (8 and 16), the codebook GEMV (token buckets 1/4/8/16) and the row-tile
    codebook GEMV (1/4/8) by graph time, written into ``cuda_lut.TUNED`` / ``cuda_mma.TUNED`` /
    ``cuda_codebook.TUNED`` / ``cuda_tile.TUNED``; ``mm``: the
    Triton tiles' config summed over the shapes at 16 tokens."""
    # programmatic dependent launch: the next kernel from the start (1), after the block loop (2)
    # or after the first block (3); none (0) never won (kernel_pdl_tuned_2026-11-29.json). Chunks
    # of 3, 5 or 6 blocks can fill the GPU in one wave where 2, 4 and 8 take 1.3 (16 tokens: 2
    # blocks of 256 threads an SM).
    # The lookup tables only at 1 token: at 4 the codebook GEMV is twice as fast.
    pdl = (1, 2, 3)
    sweeps = {"lut": (cuda_lut.TUNED, (1,), [dict(warps=w, cb=cb, pdl=p) for w in (4, 8, 16)
                                                  for cb in (1, 2, 3, 4, 6) for p in pdl]),
              "mma": (cuda_mma.TUNED, (8, 16), [dict(ksplit=k) for k in (4, 8, 16)]),
              # rings deeper than 2 stages never won (kernel_cb_columns_2026-11-29.json)
              "cb": (cuda_codebook.TUNED, cuda_codebook.BUCKETS,
                     [dict(warps=w, cb=cb, st=2, pdl=p) for w in (4, 8)
                      for cb in (2, 3, 4, 5, 6, 8) for p in pdl]),
              "tile": (cuda_tile.TUNED, cuda_tile.BUCKETS,
                       [dict(warps=w, pdl=p) for w in (8, 12, 16) for p in pdl])}
    chosen = {}
    for label, (packed, meta) in packs.items():
        rows, cols = meta["rows"], meta["cols"]
        mods = copies(functools.partial(PackedLinear, packed, meta, device="cuda"), 8 << 20, l2)
        for name, (table, tokens, configs) in sweeps.items():
            if only and name not in only:
                continue
            set_kernel(mods, name)
            for nt in tokens:
                x = torch.randn(nt, cols, device="cuda", dtype=torch.float16)
                times = []
                for cfg in configs:
                    table[(rows, cols, nt)] = cfg
                    times.append(graph_time_us(mods, x))
                best = configs[min(range(len(configs)), key=times.__getitem__)]
                table[(rows, cols, nt)] = best
                chosen[f"{name} {rows}x{cols} nt={nt}"] = {
                    "best": best, "sweep": [dict(c, us=t) for c, t in zip(configs, times)]}
                print(f"  tune {name} {label} {nt} tokens: {best} "
                      f"({min(times):.2f} us; worst {max(times):.2f})", flush=True)
        del mods
        torch.cuda.empty_cache()
    if not only or "mm" in only:
        mods = {k: copies(functools.partial(PackedLinear, p, m, device="cuda"), 8 << 20, l2)
                for k, (p, m) in packs.items()}
        xs = {k: torch.randn(16, m["cols"], device="cuda", dtype=torch.float16)
              for k, (_, m) in packs.items()}
        configs = [dict(bn=16, br=br, cw=4, split=sp, num_warps=4) for br in (32, 64)
                   for sp in (1, 4, 8)]
        times = []
        for cfg in configs:
            triton_kernels.MM_CONFIG.update(cfg)
            for ms in mods.values():
                set_kernel(ms, "triton")
            times.append(sum(graph_time_us(mods[k], xs[k]) for k in packs))
        best = configs[min(range(len(configs)), key=times.__getitem__)]
        triton_kernels.MM_CONFIG.update(best)
        chosen["mm"] = {"best": best, "sweep": [dict(c, us=t) for c, t in zip(configs, times)]}
        print(f"  tune mm: {best}", flush=True)
    return chosen


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def kernel_entry(winners: dict) -> tuple:
    """{tokens: fastest kernel} at the measured token counts -> KERNEL_TABLE entry: token counts
    up to a measured one take its winner (neighbours with the same winner merged)."""
    entry = []
    for n in sorted(winners):
        if entry and entry[-1][1] == winners[n]:
            entry[-1] = (n, winners[n])
        else:
            entry.append((n, winners[n]))
    return tuple(entry)


def bench_layers(packs, codes, bw: float, l2: int) -> list:
    rows_out = []
    for label, (packed, meta) in packs.items():
        rows, cols = meta["rows"], meta["cols"]
        pk = copies(functools.partial(PackedLinear, packed, meta, device="cuda"), 8 << 20, l2)
        pk_bytes = module_bytes(pk[0])
        w16 = fp16_copies(rows, cols, l2)
        w_ref = dequantize(codes[label]).cuda().double()
        found = {}
        for batch in BATCHES:
            x = torch.randn(batch, cols, device="cuda", dtype=torch.float16)
            ref = x.double() @ w_ref.T
            t_fp = graph_time_us(w16, x)
            t_k, err_k = {}, {}
            for kernel in module.KERNELS:  # each kernel alone
                set_kernel(pk, kernel)
                err_k[kernel] = rel_err(pk[0](x), ref)
                t_k[kernel] = graph_time_us(pk, x)
            found[batch] = {"fp16_us": t_fp, "us": t_k, "err": err_k}
        module.KERNEL_TABLE[(rows, cols)] = kernel_entry(
            {b: min(f["us"], key=f["us"].get) for b, f in found.items()})
        set_kernel(pk, "auto")
        for batch in BATCHES:
            x = torch.randn(batch, cols, device="cuda", dtype=torch.float16)
            err = rel_err(pk[0](x), x.double() @ w_ref.T)
            t_pk = graph_time_us(pk, x)
            with plain_launches():  # the same kernels in plain stream order
                t_plain = graph_time_us(pk, x)
            first = pk[0]
            t_eager = 1e3 * do_bench(lambda: first(x), rep=100, return_mode="median")  # noqa: B023
            f, io = found[batch], 2 * batch * (rows + cols)
            row = {"shape": f"{rows}x{cols}", "layer": label, "batch": batch,
                   "kernel": module.kernel_for(rows, cols, batch), "fp16_us": f["fp16_us"],
                   "packed_us": t_pk, "packed_no_pdl_us": t_plain, "packed_eager_us": t_eager,
                   **{f"packed_{k}_us": f["us"][k] for k in module.KERNELS},
                   **{f"rel_err_{k}": f["err"][k] for k in module.KERNELS},
                   "speedup": f["fp16_us"] / t_pk,
                   "packed_GBps": (pk_bytes + io) / t_pk * 1e-3,
                   "fp16_GBps": (rows * cols * 2 + io) / f["fp16_us"] * 1e-3,
                   "packed_bw_frac": (pk_bytes + io) / (t_pk * 1e-6) / bw,
                   "fp16_bw_frac": (rows * cols * 2 + io) / (f["fp16_us"] * 1e-6) / bw,
                   "packed_MB": pk_bytes / 1e6, "rel_err_vs_dequant": err}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        del pk, w16
        torch.cuda.empty_cache()
    return rows_out


def decode_tps(model, new_tokens: int = 64) -> float:
    """Greedy generate tokens/s at batch 1 (eager HF loop, dynamic cache)."""
    prompt = torch.randint(0, 32000, (1, 32), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kw)
    torch.cuda.synchronize()
    tick = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - tick)


def graph_step_ms(model) -> float:
    """Milliseconds per decode step of the whole model replayed as one CUDA graph (static cache)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=256)
    ids = torch.randint(0, 32000, (1, 1), device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")

    def step():
        return model(input_ids=ids, past_key_values=cache, cache_position=pos,
                     position_ids=pos[None], use_cache=True).logits

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(5):
        pos.fill_(i)
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5, 69):
        pos.fill_(i)
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 64


def bench_7b(packs) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA7B)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    out = {"fp16_eager_tok_s": decode_tps(model)}
    try:
        out["fp16_graph_tok_s"] = 1e3 / graph_step_ms(model)
    except Exception as exc:  # report, keep going: the eager number stands
        out["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    by_shape = {(m["rows"], m["cols"]): (p, m) for p, m in packs.values()}
    replace_decoder_linears(model, torch.nn.Linear,
                            lambda mod: PackedLinear(*by_shape[tuple(mod.weight.shape)], device="cuda"))
    linear_bytes = sum(tensor_bytes(m.packed) for m in model.modules() if isinstance(m, PackedLinear))
    torch.cuda.empty_cache()
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    out.update(packed_linear_GB=linear_bytes / 1e9, fp16_rest_GB=rest / 1e9,
               packed_eager_tok_s=decode_tps(model))
    if "graph_error" not in out:
        out["packed_graph_tok_s"] = 1e3 / graph_step_ms(model)
        with plain_launches():
            out["packed_graph_no_pdl_tok_s"] = 1e3 / graph_step_ms(model)
        # the floor: everything but the decoder linears
        replace_decoder_linears(model, PackedLinear, lambda mod: Free(mod.out_features))
        out["no_linear_graph_tok_s"] = 1e3 / graph_step_ms(model)
    return out


def replace_decoder_linears(model, kind: type, make) -> None:
    """Every ``kind`` child of the decoder layers' attention and MLP becomes ``make(child)``."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, kind):
                    setattr(parent, name, make(mod))


class Free(torch.nn.Module):
    """A linear's output shape and nothing else (uninitialized): a decode step's floor."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], self.rows)


def print_report(report: dict, tables: dict) -> None:
    print(f"\n{report['device']}, copy {report['copy_GBps']:.0f} GB/s, "
          f"{report['seconds']:.0f} s; configs {report['configs']}")
    print("| layer | shape | batch | fp16 us | packed us | no PDL us | kernel | "
          + "".join(f"{k} us | " for k in module.KERNELS)
          + "speedup | packed GB/s | % copy BW (fp16) | rel err |")
    print("|---" * (11 + len(module.KERNELS)) + "|")
    bad = []
    for r in report["layers"]:
        print(f"| {r['layer']} | {r['shape']} | {r['batch']} | {r['fp16_us']:.1f} | "
              f"{r['packed_us']:.1f} | {r['packed_no_pdl_us']:.1f} | {r['kernel']} | "
              + "".join(f"{r[f'packed_{k}_us']:.1f} | " for k in module.KERNELS)
              + f"{r['speedup']:.2f}x | "
              f"{r['packed_GBps']:.0f} | {100 * r['packed_bw_frac']:.0f}% "
              f"({100 * r['fp16_bw_frac']:.0f}%) | {r['rel_err_vs_dequant']:.1e} |")
        errs = [r["rel_err_vs_dequant"]] + [r[f"rel_err_{k}"] for k in module.KERNELS]
        if not all(e < TOL for e in errs):  # NaN fails too
            bad.append((r["shape"], r["batch"], errs))
    if "llama7b" in report:
        d = report["llama7b"]
        print(f"\n7B-shaped decode, tok/s: one CUDA graph per step fp16 "
              f"{d.get('fp16_graph_tok_s', float('nan')):.1f} packed "
              f"{d.get('packed_graph_tok_s', float('nan')):.1f}; eager generate fp16 "
              f"{d['fp16_eager_tok_s']:.1f} packed {d['packed_eager_tok_s']:.1f}")
        if "no_linear_graph_tok_s" in d:
            floor = d["no_linear_graph_tok_s"] / d["fp16_graph_tok_s"]
            print(f"graph packed without programmatic dependent launch "
                  f"{d['packed_graph_no_pdl_tok_s']:.1f}; with free decoder linears (the ceiling "
                  f"of any linear kernel) {d['no_linear_graph_tok_s']:.1f} = {floor:.2f}x fp16")
    for batch, target in ((1, 2.5), (4, 1.5), (16, 1.0)):
        got = [r["speedup"] for r in report["layers"] if r["batch"] == batch]
        print(f"target batch {batch} >= {target}x: min {min(got):.2f}x -> "
              f"{'met' if min(got) >= target else 'NOT met'}")
    if "llama7b" in report and "packed_graph_tok_s" in report["llama7b"]:
        d = report["llama7b"]
        ratio = d["packed_graph_tok_s"] / d["fp16_graph_tok_s"]
        print(f"target 7B decode >= 2x fp16: {ratio:.2f}x -> {'met' if ratio >= 2 else 'NOT met'}")
    print("\n# measured tables (record in hbllm/packed/module.py, cuda_lut.py, cuda_mma.py):")
    print("KERNEL_TABLE =", tables["kernel"])
    print("cuda_lut.TUNED =", tables["lut"])
    print("cuda_mma.TUNED =", tables["mma"])
    print("cuda_codebook.TUNED =", tables["cb"])
    print("cuda_tile.TUNED =", tables["tile"])
    print("ALL OUTPUTS WITHIN TOL" if not bad else f"ERRORS ABOVE {TOL}: {bad}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", nargs="*", default=None, metavar="KERNEL",
                    help="sweep the kernels' launch configs before timing (all, or those named: "
                         "lut mma cb tile mm); lut, mma, cb and tile per shape")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    report = {"device": props.name, "sms": props.multi_processor_count, "l2_MB": l2 / 1e6,
              "torch": torch.__version__, "triton": triton.__version__}
    report["copy_GBps"] = copy_bandwidth() / 1e9
    print(json.dumps(report), flush=True)
    quant = QuantConfig(method="hbllm", layout="row")
    packs, codes_by_label, report["quantize"] = {}, {}, {}
    for i, (label, (rows, cols)) in enumerate(SHAPES.items()):
        codes, bits, secs = quantize_shape(rows, cols, quant, seed=i)
        codes_by_label[label] = codes
        packed = pack_linear(codes)
        packs[label] = (packed, linear_meta(codes))
        disk_bits = 8 * tensor_bytes(packed) / (rows * cols)
        report["quantize"][label] = {"seconds": secs, "bits_full": bits["full"],
                                     "bits_paper": bits["paper"], "bits_on_disk": disk_bits}
        print(label, json.dumps(report["quantize"][label]), flush=True)
    if args.tune is not None:
        report["tuning"] = tune(packs, l2, args.tune)
    report["configs"] = {"lut": dict(cuda_lut.CONFIG), "mma": dict(cuda_mma.CONFIG),
                         "cb": dict(cuda_codebook.CONFIG),
                         "tile": dict(cuda_tile.CONFIG),
                         "triton_gemv": dict(triton_kernels.GEMV_CONFIG),
                         "mm": dict(triton_kernels.MM_CONFIG)}
    report["layers"] = bench_layers(packs, codes_by_label, report["copy_GBps"] * 1e9, l2)
    tables = {"kernel": dict(module.KERNEL_TABLE), "lut": dict(cuda_lut.TUNED),
              "mma": dict(cuda_mma.TUNED), "cb": dict(cuda_codebook.TUNED),
              "tile": dict(cuda_tile.TUNED)}
    if not args.skip_7b:
        report["llama7b"] = bench_7b(packs)
        print(json.dumps(report["llama7b"]), flush=True)
    report["seconds"] = time.perf_counter() - start
    report["tables"] = {name: {repr(k): v for k, v in t.items()} for name, t in tables.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print_report(report, tables)


if __name__ == "__main__":
    main()

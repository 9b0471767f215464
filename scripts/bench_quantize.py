"""Time the quantizers on one LLaMA-2-7B decoder layer's seven linears (synthetic inputs).

Weights: heavy-tailed (Student-t, 3 dof) with a few large input columns. Hessian: ``2/N X^T X``
from correlated activations (low-rank mixing plus noise) with a few outlier channels.
Prints seconds per linear and peak GPU memory; ``--out`` writes the table as JSON.

``--authors-dir DIR`` also times the authors' code on the same inputs in the same process, for
the methods that have it: ``DIR/gptq/{gptq,quant}.py`` (IST-DASLab/gptq: GPTQ and its RTN
baseline), ``DIR/pbllm/{gptq,high_quant,low_quant}.py`` (hahnyuan/PB-LLM ``gptq_pb/``) and
``DIR/arbllm/{bigptq_arb,binary_arb}.py`` with
``DIR/arbllm/utils/{structure_arb,autosearch_arb,mask}.py``
(ZHITENGLI/ARB-LLM: ARB-LLM_X and ARB-LLM_RC), copied from those repositories (never committed
here; docs/quantizers.md says how); a method whose folder is absent is skipped with a note. The
output error ``||(W-Q)L||/||WL||`` (L: Cholesky factor of H) of both is printed beside the times.

    python scripts/bench_quantize.py --device cuda --out bench.json
    python scripts/bench_quantize.py --device cuda --methods rtn gptq_w3g128 pbllm --authors-dir authors/
    python scripts/bench_quantize.py --device cuda --authors-dir authors --methods arbllm_x arbllm_rc
    python scripts/bench_quantize.py --device cpu --scale 0.125 --linears q_proj   # quick CPU run
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import time
import types
from pathlib import Path

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
    "sign": dict(method="sign"),
    "rtn": dict(method="rtn", wbits=3),
    "rtn_w3g128": dict(method="rtn", wbits=3, groupsize=128),
    "gptq_w3g128": dict(method="gptq", wbits=3, groupsize=128),
    "gptq_w3g128_act": dict(method="gptq", wbits=3, groupsize=128, act_order=True),
    "pbllm": dict(method="pbllm"),
    "arbllm_x": dict(method="arbllm_x"),
    "arbllm_rc": dict(method="arbllm_rc"),
}

AUTHORS_FAMILY = {"rtn": "gptq", "gptq": "gptq", "pbllm": "pbllm", "arbllm_x": "arbllm",
                  "arbllm_rc": "arbllm"}  # QuantConfig.method: the --authors-dir subfolder


def _load(name: str, path: Path):
    """Import the file ``path`` as module ``name`` with its folder on sys.path."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


class AuthorsCode:
    """The authors' quantizers loaded from ``--authors-dir``, run on a weight and Hessian.

    ``methods`` lists the families whose files are present (``gptq``, ``pbllm``, ``arbllm``);
    :meth:`run` returns None for the others."""

    def __init__(self, root: Path):
        if not torch.cuda.is_available():  # their loops call torch.cuda.synchronize()
            torch.cuda.synchronize = lambda *a, **k: None
        root = Path(root)
        self.methods, self._factor = set(), None
        if (root / "gptq" / "quant.py").is_file():
            self.quant = _load("authors_gptq_quant", root / "gptq" / "quant.py")
            sys.modules["quant"] = self.quant  # gptq.py does `from quant import *`
            self.gptq = _load("authors_gptq", root / "gptq" / "gptq.py")
            self.methods.add("gptq")
        if (root / "pbllm" / "gptq.py").is_file():
            self.pb = _load("authors_pbllm_gptq", root / "pbllm" / "gptq.py")
            self.pb.OUTPUTMASK = 0  # else it saves every mask under ./outputs
            self.pb_high = _load("authors_pbllm_high", root / "pbllm" / "high_quant.py")
            self.pb_low = _load("authors_pbllm_low", root / "pbllm" / "low_quant.py")
            self.methods.add("pbllm")
        if (root / "arbllm" / "bigptq_arb.py").is_file():
            self.arb, self.arb_bin = load_arbllm(root / "arbllm")
            self.methods.add("arbllm")
        if not self.methods:
            raise SystemExit(f"--authors-dir {root}: none of gptq/quant.py, pbllm/gptq.py, "
                             "arbllm/bigptq_arb.py is there (docs/quantizers.md says how to "
                             "get them)")

    def input_factor(self, h: torch.Tensor) -> torch.Tensor:
        """``A`` ``(C, C)`` with ``A^T A = H``: the one "calibration input" whose ``X^T X`` is H,
        for ARB-X's per-block ``S`` (by ``eigh`` in float64; kept for the last H, so calling it
        before timing :meth:`run` leaves it out of the authors' time)."""
        if self._factor is None or self._factor[0] is not h:
            e, v = torch.linalg.eigh(h.double())
            self._factor = (h, (e.clamp(min=0).sqrt()[:, None] * v.T).to(h.dtype))
        return self._factor[1]

    def prepare(self, cfg: QuantConfig, h: torch.Tensor) -> None:
        """Work of our adapter, not of the authors' algorithm, done before :meth:`run` is timed."""
        if cfg.method == "arbllm_x" and self.has(cfg.method):
            self.input_factor(h)

    def has(self, method: str) -> bool:
        """Whether the authors' files for ``method`` (a :data:`METHODS` method) were loaded."""
        return AUTHORS_FAMILY.get(method) in self.methods

    @staticmethod
    def _linear(w: torch.Tensor) -> torch.nn.Linear:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        lin.weight.data = w.clone()
        return lin

    def run(self, cfg: QuantConfig, w: torch.Tensor, h: torch.Tensor):
        """The dequantized weight from the authors' code for ``cfg``; None without one."""
        if not self.has(cfg.method):
            return None
        with contextlib.redirect_stdout(io.StringIO()):
            if cfg.method in ("arbllm_x", "arbllm_rc"):
                return self._arbllm(cfg, w, h)
            if cfg.method == "rtn":
                q = self.quant.Quantizer()
                q.configure(cfg.wbits, perchannel=True, sym=False, mse=False)
                if cfg.groupsize == -1:
                    q.find_params(w, weight=True)
                    return self.quant.quantize(w, q.scale, q.zero, q.maxq)
                out = torch.empty_like(w)
                for s in range(0, w.shape[1], cfg.groupsize):  # their RTN is per row; groups here
                    q.find_params(w[:, s:s + cfg.groupsize], weight=True)
                    group = w[:, s:s + cfg.groupsize]
                    out[:, s:s + cfg.groupsize] = self.quant.quantize(group, q.scale, q.zero, q.maxq)
                return out
            lin = self._linear(w)
            if cfg.method == "gptq":
                g = self.gptq.GPTQ(lin)
                g.H = h.clone()
                g.quantizer = self.quant.Quantizer()
                g.quantizer.configure(cfg.wbits, perchannel=True, sym=cfg.sym, mse=False)
                g.fasterquant(blocksize=cfg.blocksize, percdamp=cfg.percdamp, groupsize=cfg.groupsize,
                              actorder=cfg.act_order, static_groups=cfg.static_groups)
                return lin.weight.data
            if cfg.method == "pbllm":
                low = self.pb_low.LowQuantizer(lin.weight, method="xnor", groupsize=cfg.groupsize)
                high = self.pb_high.HighQuantizer(cfg.high_bit, True, False, False)
                g = self.pb.LowHighGPT(lin, low, high, salient_metric=cfg.salient_metric)
                g.H = h.clone()
                g.fasterquant(cfg.low_frac, blocksize=cfg.blocksize, percdamp=cfg.percdamp)
                return lin.weight.data
        return None

    def _arbllm(self, cfg: QuantConfig, w: torch.Tensor, h: torch.Tensor):
        """ARB-LLM_X / _RC as the authors' README commands run them (``arb-x``/``arb-rc
        --blocksize B --salient_metric hessian --num_p 1 --order2_group``): their ``BRAGPTQ``
        with a ``Binarization`` of group size B, as ``run_arb.quant_sequential`` builds them. Only
        our settings that equal theirs are compared (else None)."""
        theirs = dict(salient_metric="l1", up_lim=50, arb_iters=15, cgb=True, arb_split_on="t")
        if cfg.method == "arbllm_x":
            theirs["arb_x_iters"] = 15
        if any(getattr(cfg, k) != v for k, v in theirs.items()) or cfg.disable_gptq:
            return None
        method = "arb-x" if cfg.method == "arbllm_x" else "arb-rc"
        lin = self._linear(w)
        binar = self.arb_bin.Binarization(lin.weight, method=method, groupsize=cfg.blocksize)
        g = self.arb.BRAGPTQ(lin, binar, salient_metric="hessian", method=method, order2_group=True)
        g.H = h.clone()
        # DEBUG = True in their module: fasterquant evaluates the layer on add_batch's last input
        g.inp1, g.out1 = w.new_zeros(1, w.shape[1]), w.new_zeros(1, w.shape[0])
        if method == "arb-x":  # their S per block is mean_b X_b^T X_b of the layer's inputs
            g.inp = [self.input_factor(h)[None]]
        g.fasterquant(blocksize=cfg.blocksize, percdamp=cfg.percdamp, num_p=1)
        return lin.weight.data


def load_arbllm(folder: Path):
    """Import ARB-LLM's ``bigptq_arb`` and ``binary_arb`` from ``folder`` (their top-level imports:
    ``utils.*``, ``binary_arb``). ``bigptq_arb`` imports ``catch`` from ``exceptiongroup`` and
    never uses it; a stand-in module is registered where that package is not installed."""
    stub = importlib.util.find_spec("exceptiongroup") is None
    if stub:
        sys.modules["exceptiongroup"] = types.ModuleType("exceptiongroup")
        sys.modules["exceptiongroup"].catch = None
    saved = {k: sys.modules.pop(k) for k in list(sys.modules)
             if k in ("utils", "binary_arb") or k.startswith("utils.")}
    sys.path.insert(0, str(folder))
    try:
        binary = importlib.import_module("binary_arb")
        bigptq = importlib.import_module("bigptq_arb")
    finally:
        sys.path.remove(str(folder))
        for k in [k for k in sys.modules if k == "utils" or k.startswith("utils.")]:
            sys.modules[f"authors_arbllm_{k}"] = sys.modules.pop(k)
        sys.modules.update(saved)
        if stub:
            del sys.modules["exceptiongroup"]
    return bigptq, binary


def damped_cholesky(h: torch.Tensor) -> torch.Tensor:
    """``L`` with ``L L^T = H + 0.01 mean(diag H) I``: the metric of :func:`output_error`."""
    return torch.linalg.cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], device=h.device))


def output_error(w: torch.Tensor, q: torch.Tensor, chol: torch.Tensor) -> float:
    """``||(W - Q) L|| / ||W L||`` with ``L`` the Cholesky factor of H."""
    return float(((w - q.to(w.dtype)) @ chol).norm() / (w @ chol).norm())


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
    p.add_argument("--authors-dir", type=Path, default=None,
                   help="time the authors' code from this folder too (see the module docstring)")
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
    authors = AuthorsCode(args.authors_dir) if args.authors_dir else None
    chol = {name: damped_cholesky(h) for name, (w, h) in inputs.items()} if authors else {}
    print(f"{'method':<10} {'linear':<10} {'shape':>12} {'seconds':>8} {'peak GiB':>9} {'loss':>12} "
          f"{'bits':>5} {'full':>5}" + ("  authors s  ratio  out.err ours / authors" if authors else ""))
    for method in args.methods:
        cfg = QuantConfig(**METHODS[method])
        if authors and not authors.has(cfg.method) and cfg.method in AUTHORS_FAMILY:
            print(f"{method}: no authors' code in {args.authors_dir}/"
                  f"{AUTHORS_FAMILY[cfg.method]} (skipped; docs/quantizers.md says how to get it)")
        total = total_authors = 0.0
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
            extra = ""
            if authors:
                authors.prepare(cfg, h)
                sync(device)
                tick = time.perf_counter()
                theirs = authors.run(cfg, w, h)
                sync(device)
                if theirs is not None:
                    row["authors_seconds"] = time.perf_counter() - tick
                    total_authors += row["authors_seconds"]
                    row["out_err"] = output_error(w, res.weight, chol[name])
                    row["authors_out_err"] = output_error(w, theirs, chol[name])
                    extra = (f"  {row['authors_seconds']:9.2f} {seconds / row['authors_seconds']:6.3f}  "
                             f"{row['out_err']:.5f} / {row['authors_out_err']:.5f}")
            info["results"].append(row)
            print(f"{method:<10} {name:<10} {'x'.join(map(str, w.shape)):>12} {seconds:8.2f} {peak:9.2f} "
                  f"{res.loss:12.4g} {res.bits['paper']:5.3f} {res.bits['full']:5.3f}{extra}", flush=True)
        info["results"].append({"method": method, "linear": "TOTAL", "seconds": total,
                                **({"authors_seconds": total_authors} if total_authors else {})})
        ratio = f"  {total_authors:9.2f} {total / total_authors:6.3f}" if total_authors else ""
        print(f"{method:<10} {'TOTAL':<10} {'':>12} {total:8.2f}{ratio}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()

"""The ``hbllm`` Hydra app: calibrate, quantize layer by layer, evaluate, save, log.

    hbllm model=llama2-7b calib=c4 quant=hbllm_row
    hbllm experiment=demo data.local_dir=../shared/data

Stages, each stored in ``results.json`` as soon as it is known (and skipped on resume): baseline
perplexity / zero-shot (``eval.baseline``), layer-wise quantization (then ``save_model`` /
``save_packed`` checkpoints), perplexity, zero-shot. A failure is recorded as ``status: failed``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ModelConfig, QuantConfig, RunConfig, validate
from .results import Results, config_key

log = logging.getLogger("hbllm")

# the columns of the W&B zero-shot tables (a task without a metric gets an empty cell)
ZEROSHOT_COLUMNS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "samples")


def _run_dir_resolver(*, _root_) -> str:
    """``${hbllm_run_dir:}``: ``<model>/<method>/<calib>-<resume key>`` of the config being
    composed, so an identical config always gets the same run directory."""
    resolved = {k: OmegaConf.to_container(_root_[k], resolve=True)
                if OmegaConf.is_config(_root_[k]) else _root_[k] for k in _root_ if k != "hydra"}
    method = QuantConfig(**resolved["quant"]).label
    return f"{resolved['model']['name']}/{method}/{resolved['calib']['name']}-{config_key(resolved)}"


def _if_local(local_dir, without: List[str], with_local: List[str]) -> List[str]:
    """``${hbllm_if_local:${data.local_dir},[a],[a,b]}``: a list depending on data.local_dir."""
    return list(with_local if local_dir else without)


def register() -> None:
    """Put the schema in Hydra's ConfigStore and register the resolvers (idempotent)."""
    ConfigStore.instance().store(name="hbllm_schema", node=RunConfig)
    OmegaConf.register_new_resolver("hbllm_run_dir", _run_dir_resolver, replace=True)
    OmegaConf.register_new_resolver("hbllm_if_local", _if_local, replace=True)


register()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu or auto")
    return device


def format_table(results: Dict[str, Any]) -> str:
    """The perplexity (and zero-shot) table printed at the end of a run."""
    method = results.get("method", "quantized")
    ppl, base = results.get("ppl", {}), results.get("baseline_ppl", {})
    rows = [("metric", "full precision", method)]
    for d in dict.fromkeys([*base, *ppl]):
        rows.append((f"ppl {d}", _fmt(base.get(d)), _fmt(ppl.get(d))))
    zs, bzs = results.get("zeroshot", {}), results.get("baseline_zeroshot", {})
    for task in dict.fromkeys([*bzs, *zs]):
        get = (lambda r: r.get(task, {}).get("acc")) if task != "average" else \
            (lambda r: r.get("average"))
        rows.append((f"acc {task}", _fmt(get(bzs)), _fmt(get(zs))))
    bits = results.get("bits")
    if bits:
        rows.append(("bits/weight paper|full", "", f"{bits['paper']:.3f} | {bits['full']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _bos_id(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise ValueError("calib.bos/eval.bos=true but the tokenizer has no BOS token")
    return tokenizer.bos_token_id


def _evaluate(model, tokenizer, rc: RunConfig, eval_tokens, device, results: Results,
              tracker, prefix: str) -> None:
    """Perplexity on each dataset (and zero-shot when enabled) into ``results[prefix...]``,
    skipping what is stored already. ``prefix``: "" (quantized) or "baseline_"."""
    from .eval.perplexity import perplexity

    seqlen = rc.eval.seqlen or rc.model.seqlen
    section = f"{prefix}ppl"
    todo = [d for d in eval_tokens if d not in results.get(section, {})]
    zs_todo = rc.eval.zeroshot.enabled and f"{prefix}zeroshot" not in results.data
    if not todo and not zs_todo:
        return
    t0 = time.perf_counter()
    model.to(device)
    try:
        for d in todo:
            value = perplexity(model, eval_tokens[d], seqlen, rc.eval.max_windows,
                               rc.eval.batch_size, device, desc=f"{section} {d}",
                               bos_id=_bos_id(tokenizer) if rc.eval.bos else None)
            log.info("%s %s = %.4f", section, d, value)
            results.set_in(section, d, value)
            tracker.log({f"{section}/{d}": value})
        if zs_todo:
            from .eval.zeroshot import run_zeroshot

            zs = run_zeroshot(model, tokenizer, rc.eval.zeroshot, device)
            results.update(**{f"{prefix}zeroshot": zs})
            scalars = {f"{prefix}zeroshot/{t}/{m}": v for t, r in zs.items() if isinstance(r, dict)
                       for m, v in r.items() if isinstance(v, (int, float))}
            scalars[f"{prefix}zeroshot/average"] = zs["average"]
            tracker.log(scalars)
            tracker.table(f"{prefix}zeroshot_table", ["task", *ZEROSHOT_COLUMNS],
                          [[t, *(r.get(c) for c in ZEROSHOT_COLUMNS)] for t, r in zs.items()
                           if isinstance(r, dict)])
    finally:
        model.to("cpu")
        timing = results.get("timing", {})
        timing["eval_s"] = timing.get("eval_s", 0.0) + time.perf_counter() - t0
        results.update(timing=timing)


def run(cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """Run one experiment described by the composed ``cfg`` into ``run_dir``; returns results.
    An exception after results.json exists is recorded there (``status: failed``, ``error``)
    and re-raised."""
    rc = validate(cfg)  # wrong values fail here, before anything is loaded
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    key = config_key(resolved)
    results = Results(run_dir / "results.json", key, resume=rc.resume)
    if results.done:
        log.info("Run %s is complete in %s: nothing to do (resume=false reruns it)", key, run_dir)
        print(format_table(results.data))
        return results.data
    if results.resumed:
        log.info("Resuming run %s from %s", key, run_dir)
    results.data.pop("error", None)
    results.update(status="running", model=rc.model.name, method=rc.quant.label, config=resolved)
    try:
        _stages(rc, resolved, key, results, run_dir)
    except Exception as exc:
        _record_failure(results, exc)
        raise
    print(format_table(results.data))
    return results.data


def _record_failure(results: Results, exc: Exception) -> None:
    results.update(status="failed", error=f"{type(exc).__name__}: {exc}")


def _check_packable_shapes(model, blocksize: int) -> None:
    """save_packed: every decoder linear needs in_features divisible by blocksize and an even
    out_features (docs/packed.md); checked before any quantization work."""
    from .models import find_layers, find_linears

    prefix, layers = find_layers(model)
    bad = [f"{prefix}.{i}.{n} ({m.out_features}x{m.in_features})" for i, layer in enumerate(layers)
           for n, m in find_linears(layer).items()
           if m.in_features % blocksize or m.out_features % 2]
    if bad:
        raise ValueError(f"save_packed=true needs every linear's in_features divisible by "
                         f"quant.blocksize={blocksize} and an even out_features; not: {bad[:4]}"
                         f"{' ...' if len(bad) > 4 else ''}")


def _stages(rc: RunConfig, resolved: Dict[str, Any], key: str, results: Results,
            run_dir: Path) -> None:
    """The stages of :func:`run` not yet stored in ``results``."""
    from .data import get_calibration, get_eval_tokens
    from .models import load_model, load_tokenizer
    from .tracking import Tracker

    zs_todo = rc.eval.zeroshot.enabled and not all(
        f"{p}zeroshot" in results.data for p in ("", "baseline_")[: 1 + rc.eval.baseline])
    if zs_todo:  # unknown tasks or missing task data fail here, not after quantizing
        from .eval.zeroshot import check_tasks

        check_tasks(rc.eval.zeroshot)
    device = pick_device(rc.device)
    tokenizer = load_tokenizer(rc.model)
    seqlen = rc.eval.seqlen or rc.model.seqlen
    max_tokens = rc.eval.max_windows * seqlen if rc.eval.max_windows else None
    eval_tokens = {d: get_eval_tokens(d, rc.data, tokenizer, seqlen=seqlen, max_tokens=max_tokens)
                   for d in rc.eval.datasets}
    saved = run_dir / "model"
    # a saved fake-quantized model cannot be packed: quantize again when the packing is missing
    reuse_model = (results.resumed and (saved / ".complete").exists()
                   and (not rc.save_packed or "packed" in results.data))
    timing = results.get("timing", {})
    calib = None
    if rc.quant.method != "none" and not reuse_model:
        t0 = time.perf_counter()
        calib = get_calibration(rc.calib, rc.data, tokenizer, rc.calib.seqlen or rc.model.seqlen,
                                rc.seed)
        if rc.calib.bos:
            calib = torch.cat([torch.full_like(calib[:, :1], _bos_id(tokenizer)), calib], dim=1)
        timing["calibration_s"] = time.perf_counter() - t0
        results.update(timing=timing)

    tracker = Tracker(rc, resolved, run_dir, key)
    ok = False
    try:
        model = load_model(rc.model, rc.seed)
        if rc.save_packed and not reuse_model:
            _check_packable_shapes(model, rc.quant.blocksize)
        if rc.eval.baseline:
            _evaluate(model, tokenizer, rc, eval_tokens, device, results, tracker, "baseline_")
        if reuse_model:
            log.info("Reusing the quantized model saved in %s", saved)
            model = load_model(ModelConfig(path=str(saved), dtype=rc.model.dtype), rc.seed)
        else:
            _quantize(model, tokenizer, calib, rc, device, results, tracker, run_dir)
        _evaluate(model, tokenizer, rc, eval_tokens, device, results, tracker, "")
        results.update(status="done")
        tracker.summary(_final_summary(results.data))
        tracker.table("layers", ["index", "linear", "loss", "bits_paper", "bits_full", "time_s"],
                      [[r["index"], n, v["loss"], v["bits_paper"], v["bits_full"], r["time_s"]]
                       for r in results.get("layers", []) for n, v in r["linears"].items()])
        ok = True
    except Exception as exc:
        _record_failure(results, exc)  # before the W&B run takes its copy of results.json
        raise
    finally:
        tracker.save(results.path, run_dir)
        tracker.finish(exit_code=0 if ok else 1)


def _quantize(model, tokenizer, calib, rc: RunConfig, device, results: Results, tracker,
              run_dir: Path) -> None:
    """Layer-wise quantization into ``results`` (layers, bits, timing); then the saved model
    (``save_model``) and the packed checkpoint (``save_packed``, results ``packed``)."""
    from .pipeline import quantize_model

    def on_layer(rec: dict) -> None:
        tracker.log({"layer/index": rec["index"], "layer/loss": rec["loss"],
                     "layer/time_s": rec["time_s"]})
        results.update(layers=results.get("layers", [])[: rec["index"]] + [rec])

    packed: Dict[str, Any] = {}
    on_linear = None
    if rc.save_packed:
        from .packed import compress

        def on_linear(name: str, res) -> None:  # packed right away: ~3.9 bits/weight in memory
            packed[name] = compress(res.codes, *res.weight.shape, rc.quant)

    stats = quantize_model(model, calib, rc.quant, device, on_layer=on_layer,
                           on_linear=on_linear, return_codes=rc.save_packed, repeat=rc.repeat)
    timing = results.get("timing", {})
    timing["quantize_s"] = stats.seconds
    results.update(bits=stats.bits, timing=timing, layers=stats.layers)
    if rc.save_model:
        saved = run_dir / "model"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        (saved / ".complete").touch()
    if rc.save_packed:
        from .packed import pack

        report = pack(model, run_dir / "packed", codes=packed, quant=rc.quant)
        log.info("packed checkpoint in %s: %.4f bits/weight", run_dir / "packed",
                 report["bits_per_weight"])
        results.update(packed={"dir": "packed", **report})


def _final_summary(results: Dict[str, Any]) -> Dict[str, float]:
    """The W&B run summary: perplexities, bits, timings, zero-shot averages and the retained
    accuracy ``zeroshot/average / baseline_zeroshot/average``, packed size."""
    final = {f"ppl/{d}": v for d, v in results.get("ppl", {}).items()}
    final.update({f"baseline_ppl/{d}": v for d, v in results.get("baseline_ppl", {}).items()})
    final.update({f"bits/{k}": v for k, v in results.get("bits", {}).items()})
    final.update({f"timing/{k}": v for k, v in results.get("timing", {}).items()})
    for prefix in ("", "baseline_"):
        if f"{prefix}zeroshot" in results:
            final[f"{prefix}zeroshot/average"] = results[f"{prefix}zeroshot"]["average"]
    base = final.get("baseline_zeroshot/average")
    if "zeroshot/average" in final and base:
        final["zeroshot/retained"] = final["zeroshot/average"] / base
    if "packed" in results:
        final["packed/bits_per_weight"] = results["packed"]["bits_per_weight"]
    return final


# conf/ sits at the repository root (the package is installed editable); an absolute path works
# both for `python -m hbllm.app` and for the `hbllm` console script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Console script ``hbllm``. Returns the first perplexity (for Hydra sweepers)."""
    results = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return next(iter(results.get("ppl", {}).values()), None)


if __name__ == "__main__":
    main()

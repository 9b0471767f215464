"""The ``hbllm`` Hydra app: calibrate, quantize layer by layer, evaluate, save, log.

    hbllm model=llama2-7b calib=c4 quant=hbllm_row
    hbllm experiment=demo data.local_dir=../shared/data

Stages, each stored in the run directory as soon as it is known (and skipped on resume):
baseline perplexity / zero-shot (``eval.baseline``), layer-wise quantization (each layer stored
in ``layers/``; then ``save_model`` / ``save_packed`` checkpoints), perplexity, zero-shot. A
failure is recorded as ``status: failed``. The run directory is named after the quantized model
(:func:`hbllm.results.model_key`); each evaluation is stored with its own key, so a rerun with
more datasets, the baseline or zero-shot evaluates only those. One process at a time writes a
run directory (:class:`hbllm.results.RunLock`: a second one waits).
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import QuantConfig, RunConfig, packable_shape, schema, validate
from .results import DONE, Results, RunLock, code_revision, eval_keys, finished, missing_evals, model_key

log = logging.getLogger("hbllm")

# the columns of the W&B zero-shot tables (a task without a metric gets an empty cell)
ZEROSHOT_COLUMNS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "samples")


def _run_dir_resolver(*, _root_) -> str:
    """``${hbllm_run_dir:}``: ``<model>/<method>/<calib>-<model key>`` of the config being
    composed, so configs with the same quantized model share a run directory. Validates
    nothing: a bad value fails in its own run (:func:`run`), not in the sweep that names it."""
    resolved = {k: OmegaConf.to_container(_root_[k], resolve=True)
                if OmegaConf.is_config(_root_[k]) else _root_[k] for k in _root_ if k != "hydra"}
    try:
        method = QuantConfig(**resolved["quant"]).label
    except (TypeError, ValueError):
        method = str(resolved["quant"].get("name") or resolved["quant"].get("method"))
    return f"{resolved['model']['name']}/{method}/{resolved['calib']['name']}-{model_key(resolved)}"


class ConfigError(ValueError):
    """A config value is invalid; the message is one line saying which and why."""


def check_config(cfg: DictConfig) -> RunConfig:
    """:func:`hbllm.config.validate` with its error as one :class:`ConfigError` line; warns of
    settings that would be ignored."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        rc = validate(cfg)
    except (ValueError, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err, OmegaConfBaseException) and err.__cause__ else err
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"invalid config: {msg}") from None
    zs = rc.eval.zeroshot
    default_tasks = type(zs)().tasks
    if not zs.enabled and list(zs.tasks) != default_tasks:
        log.warning("eval.zeroshot.tasks=%s is set but eval.zeroshot.enabled=false: no zero-shot "
                    "task runs (add eval.zeroshot.enabled=true)", list(zs.tasks))
    return rc


def _if_local(local_dir, without: list[str], with_local: list[str]) -> list[str]:
    """``${hbllm_if_local:${data.local_dir},[a],[a,b]}``: a list depending on data.local_dir."""
    return list(with_local if local_dir else without)


def register() -> None:
    """Put the schema in Hydra's ConfigStore and register the resolvers (idempotent)."""
    ConfigStore.instance().store(name="hbllm_schema", node=schema())
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


def format_table(results: dict[str, Any]) -> str:
    """The perplexity (and zero-shot) table printed at the end of a run."""
    method = results.get("method", "quantized")
    ppl, base = results.get("ppl", {}), results.get("baseline_ppl", {})
    rows = [("metric", "full precision", method)]
    for d in dict.fromkeys([*base, *ppl]):
        rows.append((f"ppl {d}", _fmt(base.get(d)), _fmt(ppl.get(d))))
    zs, bzs = results.get("zeroshot", {}), results.get("baseline_zeroshot", {})
    for task in dict.fromkeys([*bzs, *zs]):
        if task == "average":
            metric = zs.get("average_metric", bzs.get("average_metric", "acc"))
            rows.append((f"average {metric}", _fmt(bzs.get(task)), _fmt(zs.get(task))))
        elif isinstance(zs.get(task, bzs.get(task)), dict):  # acc and acc_norm where the task has it
            for m in ("acc", "acc_norm"):
                if any(m in r.get(task, {}) for r in (zs, bzs)):
                    rows.append((f"{m} {task}", _fmt(bzs.get(task, {}).get(m)),
                                 _fmt(zs.get(task, {}).get(m))))
    bits = results.get("bits")
    if bits and "paper" in bits:
        rows.append(("bits/weight paper|full", "", f"{bits['paper']:.3f} | {bits['full']:.3f}"))
    if bits and "decoder_paper" in bits:
        rows.append(("decoder bits/weight paper|full", "",
                     f"{bits['decoder_paper']:.3f} | {bits['decoder_full']:.3f}"))
    coverage = results.get("coverage")
    if coverage:
        rows.append(("decoder matrices quantized", "", f"{100 * coverage['matrix_fraction']:.2f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    from .reference import format_published

    published = format_published(results)  # the papers' numbers for this model, method, protocol
    return "\n".join(lines + ([published] if published else []))


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _bos_id(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise ValueError("calib.bos/eval.bos=true but the tokenizer has no BOS token")
    return tokenizer.bos_token_id


def calibration_tokens(rc: RunConfig, tokenizer) -> torch.Tensor:
    """The run's calibration windows ``(nsamples, seqlen)`` (``seqlen + 1`` with ``calib.bos``:
    the tokenizer's BOS token first), drawn with ``rc.seed``."""
    from .data import get_calibration

    calib = get_calibration(rc.calib, rc.data, tokenizer, rc.calib.seqlen or rc.model.seqlen, rc.seed)
    if rc.calib.bos:
        calib = torch.cat([torch.full_like(calib[:, :1], _bos_id(tokenizer)), calib], dim=1)
    return calib


def _stored(results: Results, entry: str, key: str) -> bool:
    """Whether evaluation ``entry`` (``section/name``) is stored with ``key``; a value computed
    earlier with the same key under other settings of the run is brought back into view."""
    section, name = entry.split("/", 1)
    current = results.get(section) if name == "all" else results.get(section, {}).get(name)
    if results.get("eval_keys", {}).get(entry) == key and current is not None:
        return True
    archived = results.get("evals", {}).get(f"{entry}/{key}")
    if archived is None:
        return False
    _store_eval(results, entry, key, archived)
    return True


def _store_eval(results: Results, entry: str, key: str, value) -> None:
    section, name = entry.split("/", 1)
    if name == "all":
        results.update(**{section: value})
    else:
        results.set_in(section, name, value)
    results.set_in("eval_keys", entry, key)
    results.set_in("evals", f"{entry}/{key}", value)


def _pending(rc: RunConfig, resolved: dict[str, Any], results: Results, prefix: str) -> list[str]:
    """The evaluations of ``prefix`` ("" or "baseline_") not stored with their key."""
    keys = eval_keys(resolved)
    return [e for e in keys if e.split("/")[0] in (f"{prefix}ppl", f"{prefix}zeroshot")
            and not _stored(results, e, keys[e])]


def _evaluate(model, tokenizer, rc: RunConfig, resolved: dict[str, Any], eval_tokens, device,
              results: Results, tracker, prefix: str) -> None:
    """Perplexity on each dataset (and zero-shot when enabled) into ``results[prefix...]``,
    skipping what is stored already with the same evaluation key. ``prefix``: "" (quantized) or
    "baseline_"."""
    from .eval.perplexity import perplexity

    keys = eval_keys(resolved)
    todo = _pending(rc, resolved, results, prefix)
    if not todo:
        return
    seqlen = rc.eval.seqlen or rc.model.seqlen
    section = f"{prefix}ppl"
    t0 = time.perf_counter()
    model.to(device)
    try:
        for entry in todo:
            if not entry.startswith(f"{section}/"):
                continue
            d = entry.split("/", 1)[1]
            value = perplexity(model, eval_tokens[d], seqlen, rc.eval.max_windows,
                               rc.eval.batch_size, device, desc=f"{section} {d}",
                               bos_id=_bos_id(tokenizer) if rc.eval.bos else None)
            log.info("%s %s = %.4f", section, d, value)
            _store_eval(results, entry, keys[entry], value)
            tracker.log({f"{section}/{d}": value})
        if f"{prefix}zeroshot/all" in todo:
            from .eval.zeroshot import run_zeroshot

            zs = run_zeroshot(model, tokenizer, rc.eval.zeroshot, device)
            _store_eval(results, f"{prefix}zeroshot/all", keys[f"{prefix}zeroshot/all"], zs)
            scalars = {f"{prefix}zeroshot/{t}/{m}": v for t, r in zs.items() if isinstance(r, dict)
                       for m, v in r.items() if isinstance(v, (int, float))}
            scalars[f"{prefix}zeroshot/average"] = zs["average"]
            tracker.log(scalars)
            tracker.table(f"{prefix}zeroshot_table", ["task", *ZEROSHOT_COLUMNS],
                          [[t, *(r.get(c) for c in ZEROSHOT_COLUMNS)] for t, r in zs.items()
                           if isinstance(r, dict)])
    finally:
        model.to("cpu")
        _add_time(results, "eval_s", time.perf_counter() - t0)


def _add_time(results: Results, name: str, seconds: float) -> None:
    timing = results.get("timing", {})
    timing[name] = timing.get(name, 0.0) + seconds
    results.update(timing=timing)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run one experiment described by the composed ``cfg`` into ``run_dir``; returns results.
    An exception after results.json exists is recorded there (``status: failed``, ``error``)
    and re-raised. Holds the run directory's lock throughout (a second run waits)."""
    rc = check_config(cfg)  # wrong values fail here, before anything is loaded
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    key = model_key(resolved)
    with RunLock(run_dir):
        results = Results(run_dir / "results.json", key, resume=rc.resume)
        if not results.resumed:  # another model's or dropped (resume=false) stored layers
            shutil.rmtree(run_dir / "layers", ignore_errors=True)
        if _nothing_to_do(rc, resolved, results, run_dir):
            log.info("Run %s is complete in %s: nothing to do (resume=false reruns it)", key,
                     run_dir)
            print(format_table(results.data))
            return results.data
        if results.resumed:
            log.info("Resuming run %s from %s", key, run_dir)
        results.pop("error")
        results.update(status="running", model=rc.model.name, method=rc.quant.label,
                       config=resolved, code=code_revision())
        try:
            _stages(rc, resolved, key, results, run_dir)
        except Exception as exc:
            _record_failure(results, exc)
            raise
        print(format_table(results.data))
        return results.data


def _nothing_to_do(rc: RunConfig, resolved: dict[str, Any], results: Results,
                   run_dir: Path) -> bool:
    """The run's model, every evaluation asked for and the requested checkpoints are stored."""
    return (finished(results.data, resolved)
            and (not rc.save_packed or "packed" in results.data)
            and (not rc.save_model or (run_dir / "model" / ".complete").exists()))


def _record_failure(results: Results, exc: Exception) -> None:
    results.update(status="failed", error=f"{type(exc).__name__}: {exc}")


def _check_packable_shapes(model, quant: QuantConfig) -> None:
    """save_packed: every decoder weight to quantize must be an ``nn.Linear`` (MoE experts in
    fused tensors cannot be packed) with in_features divisible by blocksize and an even
    out_features (docs/packed.md); checked before any quantization work."""
    from .models import find_layers
    from .weights import quantizable_weights, select_weights

    prefix, layers = find_layers(model)
    todo = [(f"{prefix}.{i}.{w.name}", w) for i, layer in enumerate(layers)
            for w in select_weights(quantizable_weights(layer), quant.skip,
                                    quant.quantize_routers)[0]]
    experts = [n for n, w in todo if not isinstance(w.module, torch.nn.Linear)]
    if experts:
        raise ValueError(f"save_packed=true cannot pack MoE experts stored as fused tensors "
                         f"(not nn.Linear): {experts[:3]}{' ...' if len(experts) > 3 else ''}. "
                         "Use save_model=true for a fake-quantized checkpoint, or pack only the "
                         "dense parts with quant.skip=['*.experts.*'] (docs/moe.md)")
    bad = [f"{n} ({w.module.out_features}x{w.module.in_features})" for n, w in todo
           if packable_shape(w.module.out_features, w.module.in_features, quant.blocksize)]
    if bad:
        raise ValueError(f"save_packed=true needs every linear's in_features divisible by "
                         f"quant.blocksize={quant.blocksize} and an even out_features; not: "
                         f"{bad[:4]}{' ...' if len(bad) > 4 else ''}")


def _stages(rc: RunConfig, resolved: dict[str, Any], key: str, results: Results,
            run_dir: Path) -> None:
    """The stages of :func:`run` not yet stored in the run directory."""
    from .data import get_eval_tokens
    from .layer_store import LayerStore
    from .models import load_model, load_tokenizer
    from .tracking import Tracker

    t_start = time.perf_counter()
    todo = missing_evals(results.data, resolved)
    if any("zeroshot" in e for e in todo):  # unknown tasks or missing data fail here
        from .eval.zeroshot import check_tasks

        check_tasks(rc.eval.zeroshot)
    store = LayerStore(run_dir / "layers")
    if rc.save_packed and store.count() and not store.has_packed(0):
        log.warning("%s holds layers quantized without packed codes: quantizing again for "
                    "save_packed=true", store.dir)
        shutil.rmtree(store.dir)
        results.update(quantized=False)
    saved = run_dir / "model"
    # the stored layers are the quantized model: all of them must be there to skip calibration
    quantized = (bool(results.get("quantized")) and rc.quant.spec.quantizes
                 and store.count() >= len(results.get("layers", [])) > 0)
    need_model = (any(not e.startswith("baseline_") for e in todo)
                  or (rc.save_packed and "packed" not in results.data)
                  or (rc.save_model and not (saved / ".complete").exists())
                  or not results.get("quantized"))
    device = pick_device(rc.device)
    tokenizer = load_tokenizer(rc.model)
    seqlen = rc.eval.seqlen or rc.model.seqlen
    max_tokens = rc.eval.max_windows * seqlen if rc.eval.max_windows else None
    datasets = {e.split("/", 1)[1] for e in todo if "ppl/" in e}
    eval_tokens = {d: get_eval_tokens(d, rc.data, tokenizer, seqlen=seqlen, max_tokens=max_tokens)
                   for d in rc.eval.datasets if d in datasets}
    calib = None
    if rc.quant.spec.quantizes and need_model and not quantized:
        t0 = time.perf_counter()
        calib = calibration_tokens(rc, tokenizer)
        _add_time(results, "calibration_s", time.perf_counter() - t0)

    tracker = Tracker(rc, resolved, run_dir, key)
    ok = False
    try:
        t0 = time.perf_counter()
        model = load_model(rc.model, rc.seed)
        _add_time(results, "load_s", time.perf_counter() - t0)
        if rc.save_packed and not quantized:
            _check_packable_shapes(model, rc.quant)
        if rc.eval.baseline:
            _evaluate(model, tokenizer, rc, resolved, eval_tokens, device, results, tracker,
                      "baseline_")
        if need_model:
            _quantize(model, tokenizer, calib, rc, device, results, tracker, run_dir, store,
                      restore=quantized)
            _evaluate(model, tokenizer, rc, resolved, eval_tokens, device, results, tracker, "")
        results.update(status=DONE)
        timing = results.get("timing", {})
        timing["total_s"] = timing.get("total_s", 0.0) + time.perf_counter() - t_start
        results.update(timing=timing)
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
              run_dir: Path, store, restore: bool) -> None:
    """Layer-wise quantization into ``results`` (layers, bits, timing), each layer stored in
    ``store`` as it finishes and the stored ones reused (``restore``: all of them are, no
    calibration); then the saved model (``save_model``) and the packed checkpoint
    (``save_packed``, results ``packed``)."""
    from .pipeline import quantize_model, restore_model

    def on_layer(rec: dict) -> None:
        tracker.log({"layer/index": rec["index"], "layer/loss": rec["loss"],
                     "layer/time_s": rec["time_s"], "layer/hessian_s": rec["hessian_s"],
                     "layer/quantize_s": rec["quantize_s"],
                     "layer/propagate_s": rec["propagate_s"]})
        results.update(layers=results.get("layers", [])[: rec["index"]] + [rec])

    pack = None
    if rc.save_packed:
        from .packed import compress

        def pack(res):  # packed right away: ~3.9 bits/weight in memory
            return compress(res.codes, *res.weight.shape, rc.quant)

    if restore:
        log.info("Applying the quantized layers stored in %s", store.dir)
        stats = restore_model(model, store, rc.quant)
    else:
        stats = quantize_model(model, calib, rc.quant, device, on_layer=on_layer, store=store,
                               pack=pack, repeat=rc.repeat)
        if stats.restored:
            results.update(resumed_at_layer=results.get("resumed_at_layer", []) + [stats.restored])
    timing = results.get("timing", {})
    if not restore:
        timing["quantize_s"] = stats.seconds
    timing.update({f"stage_{k}": v for k, v in stats.timing.items()})
    results.update(bits=stats.bits, coverage=stats.coverage, timing=timing, layers=stats.layers,
                   quantized=True)
    if rc.save_model and not (run_dir / "model" / ".complete").exists():
        saved = run_dir / "model"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        (saved / ".complete").touch()
    if rc.save_packed and "packed" not in results.data:
        from .packed import pack as pack_model

        report = pack_model(model, run_dir / "packed", codes=stats.packed, quant=rc.quant)
        log.info("packed checkpoint in %s: %.4f bits/weight", run_dir / "packed",
                 report["bits_per_weight"])
        results.update(packed={"dir": "packed", **report})


def _final_summary(results: dict[str, Any]) -> dict[str, float]:
    """The W&B run summary: perplexities, bits, timings, zero-shot averages and the retained
    accuracy ``zeroshot/average / baseline_zeroshot/average``, packed size."""
    final = {f"ppl/{d}": v for d, v in results.get("ppl", {}).items()}
    final.update({f"baseline_ppl/{d}": v for d, v in results.get("baseline_ppl", {}).items()})
    final.update({f"bits/{k}": v for k, v in results.get("bits", {}).items()})
    coverage = results.get("coverage") or {}
    final.update({f"coverage/{k}": coverage[k] for k in ("fraction", "matrix_fraction")
                  if k in coverage})
    final.update({f"coverage/{kind}/{slot}": n for kind, d in coverage.get("by_kind", {}).items()
                  for slot, n in d.items()})
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


# The configs ship inside the package (hbllm/conf), so a plain or editable install finds them from
# any working directory; an absolute path works for `python -m hbllm.app` and the console script.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Console script ``hbllm``. Returns the first perplexity (for Hydra sweepers). An invalid
    config is one line on stderr (exit status 2); in a sweep it fails that run alone."""
    from hydra.types import RunMode

    try:
        results = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"hbllm: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return next(iter(results.get("ppl", {}).values()), None)


if __name__ == "__main__":
    main()

"""Zero-shot accuracy with lm-evaluation-harness on the in-memory (quantized) model.

``run_zeroshot`` wraps the model in ``HFLM(pretrained=<model>, tokenizer=...)`` (no reload, no
checkpoint) and runs ``lm_eval.simple_evaluate``. Tasks found in ``cfg.local_dir`` are read
from there through our task YAMLs (:mod:`hbllm.tasks.local`); the others come from the hub,
and when the hub cannot be reached the run fails at once naming ``eval.zeroshot.local_dir``.

Result (stored as ``zeroshot`` / ``baseline_zeroshot`` in results.json)::

    {<task>: {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": ..,
              "perplexity": .. (lambada), "samples": n},
     "average": mean task score, "average_metric": "acc" | "acc_norm_if_any"}

A task's score (``cfg.average``): ``acc`` -> its ``acc`` (the HBLLM paper's AvgQA convention);
``acc_norm_if_any`` -> its ``acc_norm`` where the task has one, else its ``acc``. A task with
neither scores its first higher-is-better metric. The average is the unweighted mean of the leaf
tasks' scores.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hbllm import hub
from hbllm.config import ZEROSHOT_AVERAGES, ZeroShotConfig
from hbllm.tasks import local

log = logging.getLogger(__name__)



def run_zeroshot(model, tokenizer, cfg: ZeroShotConfig, device=None) -> dict:
    """Evaluate a ``transformers`` causal LM (already on ``device`` or moved there) on
    ``cfg.tasks``. Returns the results dict described in the module docstring."""
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    return evaluate_lm(lm, cfg)


def evaluate_lm(lm, cfg: ZeroShotConfig) -> dict:
    """Run ``cfg.tasks`` on an lm-eval ``LM`` object; print and return the summary."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    with _task_manager(cfg) as manager:
        out = simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                              limit=cfg.limit, task_manager=manager, log_samples=False,
                              bootstrap_iters=cfg.bootstrap_iters)
    print(make_table(out))
    summary = summarize(out, cfg.average)
    print(f"zero-shot average of {cfg.average} ({len(task_rows(summary))} tasks): "
          f"{summary['average']:.4f}")
    return summary


def check_tasks(cfg: ZeroShotConfig) -> None:
    """Fail fast, before any model is loaded, when a task of ``cfg.tasks`` is unknown to lm-eval
    or its data is neither in ``cfg.local_dir`` nor reachable (hub online, or the HF cache when
    offline). Under a second when every task is read from ``cfg.local_dir``; ~20 s on 2 CPU cores
    otherwise (lm-eval indexes its whole task registry)."""
    with _task_manager(cfg):
        pass


@contextmanager
def _task_manager(cfg: ZeroShotConfig) -> Iterator[Any]:
    """An lm-eval ``TaskManager`` knowing every task of ``cfg.tasks``, local mirrors written as
    task YAMLs into a temporary directory that lives as long as the context; raises when a task
    is unknown or its data cannot be had."""
    from lm_eval.tasks import TaskManager

    tasks = list(cfg.tasks)
    if not tasks:
        raise ValueError("eval.zeroshot.tasks is empty")
    if cfg.local_dir and not os.path.isdir(os.path.expanduser(cfg.local_dir)):
        raise FileNotFoundError(f"eval.zeroshot.local_dir={cfg.local_dir!r} is not a directory")
    _check_hub_tasks([t for t in tasks if not local.has_local_data(cfg.local_dir, t)], cfg.local_dir)
    with tempfile.TemporaryDirectory(prefix="hbllm_tasks_") as tmp:
        written = local.write_local_tasks(tasks, cfg.local_dir, tmp, cfg.num_fewshot) if cfg.local_dir else []
        if written:
            log.info("zero-shot tasks read from %s: %s", cfg.local_dir, written)
        # lm-eval's own registry takes ~20 s to index; tasks all read locally need only ours
        hub = [t for t in tasks if t not in written]
        manager = TaskManager(include_path=tmp if written else None, include_defaults=bool(hub))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"eval.zeroshot.tasks: unknown lm-eval task(s) {unknown}")
        _check_hub_cache(hub, manager, cfg.local_dir)
        yield manager


def summarize(out: dict, average: str = "acc") -> dict:
    """lm-eval's ``simple_evaluate`` output -> ``{task: {metric: value}, "average": float,
    "average_metric": average}``.

    Metric keys ``"acc,none"`` become ``acc`` (other filters: ``acc_<filter>``); non-numeric
    values (``"N/A"`` stderr) are dropped; group rows are skipped (leaf tasks only). Every
    metric is kept (``acc`` and ``acc_norm`` both); ``average`` picks the one averaged
    (:data:`hbllm.config.ZEROSHOT_AVERAGES`, see the module docstring).
    """
    if average not in ZEROSHOT_AVERAGES:
        raise ValueError(f"average={average!r} is not one of {list(ZEROSHOT_AVERAGES)}")
    groups = set(out.get("groups", {}))
    summary: dict[str, dict] = {}
    scores: list[float] = []
    for task, metrics in out["results"].items():
        if task in groups:
            continue
        row, base = {}, {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
                out_key = name if filt == "none" else f"{name}_{filt}"
                row[out_key], base[out_key] = float(value), name
        score_key = _score_key(base, out.get("higher_is_better", {}).get(task, {}), average)
        if score_key is None:
            raise ValueError(f"task {task!r} has no accuracy-like metric to average: {sorted(row)}")
        scores.append(row[score_key])
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            row["samples"] = int(n)
        summary[task] = row
    summary["average"] = sum(scores) / len(scores) if scores else float("nan")
    summary["average_metric"] = average
    return summary


def task_rows(summary: dict) -> dict[str, dict]:
    """The per-task entries of a :func:`summarize` result (without average / average_metric)."""
    return {task: row for task, row in summary.items() if isinstance(row, dict)}


def _score_key(base: dict[str, str], higher_is_better: dict, average: str) -> str | None:
    """The result key a task contributes to the average: ``acc_norm`` when ``average`` is
    ``acc_norm_if_any`` and the task has it, else ``acc``, else its first higher-is-better
    metric (``base`` maps result keys to lm-eval metric names)."""
    if average == "acc_norm_if_any" and "acc_norm" in base:
        return "acc_norm"
    if "acc" in base:
        return "acc"
    return next((key for key, name in base.items() if higher_is_better.get(name)), None)


def _missing_data_error(tasks: list[str], local_dir: str | None, reason: str) -> RuntimeError:
    lines = []
    for task in tasks:
        if task in local.local_task_names():
            where = local.expected_file(local_dir or "<local_dir>", task)
            lines.append(f"  {task}: put its evaluation split at {where} (or .parquet)")
        else:
            lines.append(f"  {task}: no air-gapped template (available: {', '.join(local.local_task_names())})")
    return RuntimeError(
        f"zero-shot data unavailable: the Hugging Face hub cannot be used ({reason}) and "
        f"eval.zeroshot.local_dir={local_dir!r} does not hold these tasks:\n" + "\n".join(lines)
        + "\nSet eval.zeroshot.local_dir to a local mirror (layout: docs/zeroshot.md), or drop the "
        "tasks from eval.zeroshot.tasks.")


def _check_hub_tasks(tasks: list[str], local_dir: str | None) -> None:
    """Fail at once when tasks need the hub, the hub is unreachable and no offline flag
    lets ``datasets`` use its cache (checked later by :func:`_check_hub_cache`)."""
    if not tasks:
        return
    reason = hub.offline_reason()
    if reason is None:
        return
    if not hub.offline_setting():  # datasets would retry the network for each task
        raise _missing_data_error(tasks, local_dir, reason + "; set HF_DATASETS_OFFLINE=1 to use "
                                  "datasets already in the Hugging Face cache")


def _check_hub_cache(tasks: list[str], manager, local_dir: str | None) -> None:
    """In ``datasets`` offline mode, require each hub task's dataset to be in the HF cache."""
    from datasets import load_dataset_builder

    if not tasks or not hub.offline_setting():
        return
    missing = []
    for task in tasks:
        entry = manager.task_index[task]
        cfg = entry.cfg or {}
        if "dataset_path" not in cfg:  # groups/tags: their members are checked by lm-eval
            continue
        try:
            load_dataset_builder(cfg["dataset_path"], cfg.get("dataset_name"))
        except Exception:  # noqa: BLE001 - not cached (ConnectionError, FileNotFoundError ...)
            missing.append(task)
    if missing:
        raise _missing_data_error(missing, local_dir, "datasets offline mode, not in the HF cache")

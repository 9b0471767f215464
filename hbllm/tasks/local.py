"""Point our lm-eval task YAMLs (this folder) at a local data mirror.

Mirror layout: ``<local_dir>/<task>/<split>.jsonl`` (or ``.parquet``), with the field names of
the hub dataset the built-in lm-eval task reads. ``<split>`` is the split lm-eval evaluates:
the task's ``test_split`` when it has one, its ``validation_split`` otherwise
(:func:`eval_split`). Other splits of the task (``train`` ...) are used when present; few-shot
runs need the split lm-eval draws examples from.

At run time :func:`write_local_tasks` writes, per task found in the mirror, a small YAML that
``include``s our template and sets ``dataset_path`` (json | parquet), ``dataset_kwargs.data_files``
(absolute paths) and the splits present. The folder is then passed to
``TaskManager(include_path=...)``, where it overrides the built-in task of the same name.
"""
from __future__ import annotations

from pathlib import Path

import yaml

TEMPLATE_DIR = Path(__file__).resolve().parent
FORMATS = (("jsonl", "json"), ("parquet", "parquet"))  # (file suffix, datasets builder)
SPLIT_KEYS = ("training_split", "validation_split", "test_split")


def local_task_names() -> list[str]:
    """Tasks that have an air-gapped template here (sorted)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def template(task: str, resolve_functions: bool = False) -> dict:
    """Our template for ``task`` as lm-eval parses it (``!function`` left as paths unless
    ``resolve_functions``)."""
    path = TEMPLATE_DIR / f"{task}.yaml"
    if not path.is_file():
        raise KeyError(f"no air-gapped template for task {task!r}; available: {local_task_names()}")
    return load_task_yaml(path, resolve_functions)


def load_task_yaml(path: Path, resolve_functions: bool = False) -> dict:
    """A task YAML as lm-eval reads it (``include`` merged, ``!function`` tags). lm-eval has no
    public loader for one file, so this is the one place hbllm uses its private
    ``lm_eval.tasks._yaml_loader`` (lm-eval 0.4.13); another version fails here, clearly."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as err:
        from importlib.metadata import version

        raise ImportError("hbllm reads lm-eval task YAMLs with lm_eval.tasks._yaml_loader."
                          f"load_yaml of lm-eval 0.4.13, which lm-eval {version('lm-eval')} "
                          "does not have: pip install 'lm-eval==0.4.13'") from err
    return load_yaml(path, resolve_func=resolve_functions)


def eval_split(cfg: dict) -> str:
    """The split lm-eval evaluates: ``test_split`` if set, else ``validation_split``."""
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise ValueError(f"task {cfg.get('task')!r} defines neither test_split nor validation_split")
    return split


def fewshot_split(cfg: dict) -> str:
    """The split lm-eval draws few-shot examples from (fewshot_split, else train, val, test)."""
    for key in ("fewshot_split", *SPLIT_KEYS):
        if cfg.get(key):
            return cfg[key]
    raise ValueError(f"task {cfg.get('task')!r} has no split to draw few-shot examples from")


def expected_file(local_dir: str | Path, task: str) -> Path:
    """Where the mirror must hold ``task``'s evaluation split (the .jsonl spelling)."""
    return Path(local_dir).expanduser() / task / f"{eval_split(template(task))}.jsonl"


def find_split(local_dir: str | Path, task: str, split: str) -> tuple[Path, str] | None:
    """``(file, builder)`` of ``<local_dir>/<task>/<split>.jsonl|parquet``, or None."""
    for suffix, builder in FORMATS:
        path = Path(local_dir).expanduser().resolve() / task / f"{split}.{suffix}"
        if path.is_file():
            return path, builder
    return None


def has_local_data(local_dir: str | Path | None, task: str) -> bool:
    """True when ``task`` has a template and its evaluation split is in the mirror."""
    if not local_dir or task not in local_task_names():
        return False
    return find_split(local_dir, task, eval_split(template(task))) is not None


def local_task_config(local_dir: str | Path, task: str, num_fewshot: int = 0) -> dict:
    """The run-time overlay for ``task``: include our template, read the mirror's files.

    Splits missing from the mirror are set to null so lm-eval never asks for them; a few-shot
    run whose example split is missing raises instead of silently sampling elsewhere.
    """
    cfg = template(task)
    files: dict[str, str] = {}
    builders = set()
    overlay: dict = {"include": str(TEMPLATE_DIR / f"{task}.yaml")}
    for key in SPLIT_KEYS:
        split = cfg.get(key)
        found = find_split(local_dir, task, split) if split else None
        overlay[key] = split if found else None
        if found:
            files[split] = str(found[0])
            builders.add(found[1])
    if eval_split(cfg) not in files:
        raise FileNotFoundError(f"{expected_file(local_dir, task)} (or .parquet) not found")
    if num_fewshot > 0 and fewshot_split(cfg) not in files:
        raise FileNotFoundError(
            f"eval.zeroshot.num_fewshot={num_fewshot}: task {task!r} draws few-shot examples from "
            f"its {fewshot_split(cfg)!r} split; put it at "
            f"{Path(local_dir).expanduser() / task / (fewshot_split(cfg) + '.jsonl')}")
    if len(builders) > 1:
        raise ValueError(f"{Path(local_dir) / task}: mix of .jsonl and .parquet splits; use one format")
    overlay["dataset_path"] = builders.pop()
    overlay["dataset_name"] = None
    overlay["dataset_kwargs"] = {"data_files": files}
    return overlay


def write_local_tasks(tasks: list[str], local_dir: str | Path, out_dir: str | Path,
                      num_fewshot: int = 0) -> list[str]:
    """Write ``<out_dir>/<task>.yaml`` overlays for the tasks present in ``local_dir``.

    Returns the names written (the others are left to the built-in, hub-backed tasks).
    """
    written = []
    for task in tasks:
        if has_local_data(local_dir, task):
            overlay = local_task_config(local_dir, task, num_fewshot)
            (Path(out_dir) / f"{task}.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
            written.append(task)
    return written

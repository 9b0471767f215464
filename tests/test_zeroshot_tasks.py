"""Our air-gapped task YAMLs (hbllm/tasks) must not drift from the installed lm-eval's
built-in tasks: same prompt, choices, target, splits, metrics, processing functions."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from hbllm.config import ZEROSHOT_TASKS
from hbllm.tasks import local

DATA = Path(__file__).parent / "data" / "zeroshot"
# where the data comes from (ours: the local mirror) and lm-eval grouping tags
LOCATION_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "tag"}


@pytest.fixture(scope="module")
def builtin_index():
    return TaskManager().task_index


def comparable(value):
    """Functions by their defining file and name (ours import the installed module; the
    built-in loads it from its path), everything else as is."""
    if callable(value):
        return ("function", str(Path(inspect.getsourcefile(value)).resolve()), value.__qualname__)
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def without_location(cfg: dict) -> dict:
    return {k: comparable(v) for k, v in cfg.items() if k not in LOCATION_KEYS}


def test_templates_cover_default_tasks():
    assert set(ZEROSHOT_TASKS) <= set(local.local_task_names())


@pytest.mark.parametrize("task", local.local_task_names())
def test_template_matches_builtin(task, builtin_index):
    entry = builtin_index[task]
    builtin = load_yaml(entry.yaml_path, resolve_func=True)
    ours = local.template(task, resolve_functions=True)
    assert ours["task"] == builtin["task"] == task
    assert without_location(ours) == without_location(builtin)
    assert ours["dataset_path"] == "json" and ours.get("dataset_name") is None


@pytest.mark.parametrize("task", ZEROSHOT_TASKS)
def test_runtime_overlay_keeps_template(task, tmp_path):
    """The YAML written at run time only changes the data source and drops absent splits."""
    assert local.write_local_tasks([task], DATA, tmp_path) == [task]
    rendered = load_yaml(tmp_path / f"{task}.yaml", resolve_func=True)
    ours = local.template(task, resolve_functions=True)
    splits = set(local.SPLIT_KEYS)
    assert without_location({k: v for k, v in rendered.items() if k not in splits}) == \
        without_location({k: v for k, v in ours.items() if k not in splits})
    eval_split = local.eval_split(ours)
    assert local.eval_split(rendered) == eval_split
    files = rendered["dataset_kwargs"]["data_files"]
    assert Path(files[eval_split]) == (DATA / task / f"{eval_split}.jsonl").resolve()
    for key in splits:  # a split is declared iff its file is there, with the template's name
        assert rendered.get(key) in (None, ours.get(key))
        assert (rendered.get(key) is not None) == (rendered.get(key) in files)


def test_drift_is_detected(builtin_index):
    """The comparison really sees a changed prompt or function."""
    ours = local.template("piqa", resolve_functions=True)
    builtin = load_yaml(builtin_index["piqa"].yaml_path, resolve_func=True)
    assert without_location({**ours, "doc_to_text": "Q: {{goal}}\nA:"}) != without_location(builtin)
    wino = local.template("winogrande", resolve_functions=True)
    swapped = {**wino, "doc_to_text": wino["doc_to_target"]}
    assert without_location(swapped) != without_location(load_yaml(builtin_index["winogrande"].yaml_path))

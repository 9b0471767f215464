"""Build the air-gapped zero-shot mirror on a machine with internet access.

    python -m hbllm.tasks.mirror /path/to/mirror                    # the nine default tasks
    python -m hbllm.tasks.mirror /path/to/mirror piqa arc_easy --fewshot

Downloads, through ``datasets``, the hub dataset each installed built-in lm-eval task reads
and writes the split lm-eval evaluates as ``<mirror>/<task>/<split>.jsonl`` (with
``--fewshot`` also the split few-shot examples come from). Copy the folder to the cluster
and set ``eval.zeroshot.local_dir`` to it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hbllm.config import ZEROSHOT_TASKS
from hbllm.tasks import local


def mirror_tasks(tasks: list[str], out_dir: str | Path, fewshot: bool = False) -> list[Path]:
    """Write the mirror files of ``tasks`` under ``out_dir``; returns the files written."""
    import datasets
    from lm_eval.tasks import TaskManager

    unknown = [t for t in tasks if t not in local.local_task_names()]
    if unknown:
        raise KeyError(f"no air-gapped template for task(s) {unknown}; available: {local.local_task_names()}")
    index = TaskManager().task_index
    written = []
    for task in tasks:
        builtin = index[task].cfg  # dataset_path / dataset_name of the installed built-in task
        ours = local.template(task)
        splits = dict.fromkeys([local.eval_split(ours)] + ([local.fewshot_split(ours)] if fewshot else []))
        for split in splits:
            path = Path(out_dir) / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = datasets.load_dataset(builtin["dataset_path"], builtin.get("dataset_name"), split=split)
            data.to_json(str(path), lines=True)
            written.append(path)
            print(f"{task}: {len(data)} records -> {path}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="mirror folder (eval.zeroshot.local_dir)")
    parser.add_argument("tasks", nargs="*", default=list(ZEROSHOT_TASKS))
    parser.add_argument("--fewshot", action="store_true", help="also the few-shot example split")
    args = parser.parse_args(argv)
    mirror_tasks(args.tasks, args.out_dir, args.fewshot)


if __name__ == "__main__":
    main()

"""What the repeats of one config could share: time the seed-independent steps of one run.

A run of ``hbllm`` loads the tokenizer and the model, tokenizes the evaluation sets and samples
the calibration windows (the only one of these that depends on ``seed``) before quantizing
layer by layer; every repeat (``seed``/``repeat``, one process per run) does all of it again.
This script times each step in the setting of a config (default: the Gemma study's), so the
saving of sharing them can be set against the run's own ``timing`` in results.json.

    python scripts/bench_repeat_shared.py                                 # the Gemma study setting
    python scripts/bench_repeat_shared.py model=tiny-llama calib=wiki_sample eval=quick
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import hbllm.app  # noqa: F401  (registers the schema and resolvers)
from hbllm.config import validate

CONF = Path(__file__).resolve().parents[1] / "hbllm" / "conf"
STUDY = ["experiment=gemma3_study", "quant=hbllm_row", "data.local_dir=../shared/data"]


def main(overrides) -> None:
    from hbllm.data import get_calibration, get_eval_tokens
    from hbllm.models import load_model, load_tokenizer

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*(list(overrides) or STUDY), "logger.group=bench"])
    rc = validate(cfg)
    seqlen = rc.eval.seqlen or rc.model.seqlen
    max_tokens = rc.eval.max_windows * seqlen if rc.eval.max_windows else None
    times = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        print(f"{name:28s} {times[name]:7.2f} s", flush=True)
        return out

    tok = timed("load tokenizer", lambda: load_tokenizer(rc.model))
    timed("load model", lambda: load_model(rc.model, rc.seed))
    for d in rc.eval.datasets:
        timed(f"eval tokens {d}", functools.partial(get_eval_tokens, d, rc.data, tok, seqlen=seqlen,
                                                    max_tokens=max_tokens))
    for seed in (0, 1):  # depends on the seed: shareable only between repeat-only runs
        timed(f"calibration seed {seed}", functools.partial(
            get_calibration, rc.calib, rc.data, tok, rc.calib.seqlen or rc.model.seqlen, seed))
    shared = sum(v for k, v in times.items() if not k.startswith("calibration"))
    print(f"{'seed-independent total':28s} {shared:7.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Zero-shot through the Hydra app: tiny random LLaMA quantized with `sign`, baseline on,
tasks read from our small local files; results.json and the W&B offline run hold both runs."""
import json
from pathlib import Path

import pytest

from conftest import compose, wandb_logged
from hbllm import app

DATA = Path(__file__).parent / "data" / "zeroshot"
TASKS = ["piqa", "winogrande", "lambada_openai"]
RUN = ["model=tiny-llama", "quant=sign", "calib=wiki_sample", "calib.nsamples=4",
       "calib.seqlen=64", "eval.datasets=[wiki_sample]", "eval.seqlen=64", "eval.max_windows=2",
       "eval.baseline=true", "logger=offline", "eval=zeroshot",
       f"eval.zeroshot.tasks=[{','.join(TASKS)}]", f"eval.zeroshot.local_dir={DATA}",
       "eval.zeroshot.batch_size=8", "eval.zeroshot.bootstrap_iters=100"]


def test_app_records_quantized_and_baseline_zeroshot(tmp_path, capsys):
    results = app.run(compose(*RUN), tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored == json.loads(json.dumps(results)) and stored["status"] == "done"
    for section in ("zeroshot", "baseline_zeroshot"):
        zs = stored[section]
        assert set(zs) == {*TASKS, "average", "average_metric"}, section
        assert zs["average_metric"] == "acc"  # eval.zeroshot.average, the paper's convention
        assert zs["average"] == pytest.approx(sum(zs[t]["acc"] for t in TASKS) / len(TASKS))
        assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(zs["piqa"])
        assert "perplexity" in zs["lambada_openai"]
    # 1-bit sign quantization changes the model, so lambada's perplexity changes
    assert stored["zeroshot"]["lambada_openai"]["perplexity"] != \
        pytest.approx(stored["baseline_zeroshot"]["lambada_openai"]["perplexity"])
    assert stored["config"]["eval"]["zeroshot"]["local_dir"] == str(DATA)

    logged = {k: v for row in wandb_logged(tmp_path)["history"] for k, v in row.items()}
    for section in ("zeroshot", "baseline_zeroshot"):
        assert logged[f"{section}/average"] == pytest.approx(stored[section]["average"])
        assert logged[f"{section}/piqa/acc_norm"] == pytest.approx(stored[section]["piqa"]["acc_norm"])
        assert logged[f"{section}/lambada_openai/perplexity"] == \
            pytest.approx(stored[section]["lambada_openai"]["perplexity"])
        assert logged[f"{section}_table/nrows"] == len(TASKS)
    got = wandb_logged(tmp_path)
    summary = got["summary"]
    for section in ("zeroshot", "baseline_zeroshot"):
        assert summary[f"{section}/average"] == pytest.approx(stored[section]["average"])
    assert summary["zeroshot/retained"] == pytest.approx(
        stored["zeroshot"]["average"] / stored["baseline_zeroshot"]["average"])
    columns = ["task", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "samples"]
    for section in ("zeroshot", "baseline_zeroshot"):
        [table] = [json.loads(p.read_text()) for p in tmp_path.rglob(f"{section}_table_*.table.json")]
        assert table["columns"] == columns
        rows = {r[0]: dict(zip(columns, r)) for r in table["data"]}
        assert set(rows) == set(TASKS)
        for task in TASKS:
            want = stored[section][task]
            assert rows[task]["samples"] == want["samples"] > 0
            for c in columns[1:6]:
                assert rows[task][c] == (pytest.approx(want[c]) if c in want else None), (task, c)
        assert rows["lambada_openai"]["perplexity"] > 1 and rows["piqa"]["acc_norm"] is not None
    [saved] = [p for p in tmp_path.rglob("files/results.json") if "wandb" in p.parts]
    assert json.loads(saved.read_text()) == stored
    printed = capsys.readouterr().out
    assert "winogrande" in printed and f"{stored['zeroshot']['average']:.4f}" in printed
    # the run's own table: acc and acc_norm where the task has both, the averaged metric named
    assert "acc_norm piqa" in printed and "acc winogrande" in printed and "average acc" in printed
    assert "acc_norm winogrande" not in printed

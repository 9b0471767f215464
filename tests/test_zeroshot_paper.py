"""The paper's protocol: experiment=paper_table1 expands to the exact jobs of the HBLLM paper's
Table 1, and hbllm/reference (published numbers) is matched to runs by model, method and
protocol, in the printed run table and in hbllm-report."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from hbllm import reference
from hbllm.app import format_table
from hbllm.config import ZEROSHOT_TASKS
from hbllm.report import build_report
from test_presets import _compose, _validate, expand

TABLE1_METHODS = ["fp16", "billm", "hbllm_row", "hbllm_col"]


def test_paper_table1_expands_to_the_papers_rows():
    jobs = expand("paper_table1", ["model=llama2-7b"])
    assert jobs == [[f"quant={m}", "experiment=paper_table1", "model=llama2-7b"]
                    for m in TABLE1_METHODS]
    for job, method in zip(jobs, TABLE1_METHODS):
        cfg = _compose([*job, "hydra/launcher=slurm_h100"])
        HydraConfig.instance().set_config(cfg)
        assert cfg.hydra.launcher.constraint == "h100"
        assert cfg.hydra.sweep.dir == "multirun/paper_table1/llama2-7b"
        rc = _validate(cfg)
        assert rc.quant.label == method and rc.model.name == "llama2-7b"
        assert (rc.calib.name, rc.calib.nsamples, rc.calib.seqlen) == ("c4", 128, 2048)
        assert rc.eval.datasets == ["wikitext2", "c4", "ptb"] and rc.eval.seqlen == 2048
        assert rc.eval.max_windows is None and not rc.eval.baseline
        zs = rc.eval.zeroshot
        assert zs.enabled and tuple(zs.tasks) == ZEROSHOT_TASKS and zs.average == "acc"
        assert zs.limit is None and zs.num_fewshot == 0
        assert reference.protocol_matches(resolved(cfg))
        assert not reference.protocol_matches(resolved(_compose([*job, "calib.nsamples=32"])))


def resolved(cfg) -> dict:
    """The resolved job config as results.json stores it (without Hydra's node)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
            else cfg[k] for k in cfg if k != "hydra"}


def test_protocol_matching():
    cfg = {"model": {"seqlen": 2048}, "calib": {"name": "c4", "nsamples": 128, "seqlen": None},
           "eval": {"seqlen": None, "max_windows": None, "bos": False,
                    "zeroshot": {"limit": None, "num_fewshot": 0}}}
    assert reference.protocol_matches(cfg)  # seqlen null = model.seqlen = 2048
    for path, value in [("model.seqlen", 4096), ("calib.name", "wikitext2"),
                        ("calib.nsamples", 256), ("eval.max_windows", 8), ("eval.bos", True),
                        ("eval.zeroshot.limit", 50), ("eval.zeroshot.num_fewshot", 5)]:
        changed = json.loads(json.dumps(cfg))
        *parents, leaf = path.split(".")
        node = changed
        for p in parents:
            node = node[p]
        node[leaf] = value
        assert not reference.protocol_matches(changed), path


def test_shipped_table_has_a_source_for_every_number():
    rows = reference.load()
    conf = Path(__file__).resolve().parents[1] / "hbllm" / "conf"
    models = {p.stem for p in (conf / "model").glob("*.yaml")}
    assert rows, "published.csv is empty"
    for row in rows:
        # the arXiv id and the table or figure the number is printed in
        assert re.fullmatch(r"arXiv:\d{4}\.\d{5}, .*(table|figure).*", row.source, re.I), row
        assert row.paper in ("HBLLM", "BiLLM") and row.model in models, row
        assert row.metric in ("ppl", "acc", "acc_norm"), row
        assert row.dataset in (*reference.PPL_DATASETS, "avgqa", *ZEROSHOT_TASKS), row
        assert (row.metric == "ppl") == (row.dataset in reference.PPL_DATASETS), row
        assert row.value > 0
    keys = [(r.paper, r.source, r.model, r.method, r.dataset, r.metric) for r in rows]
    assert len(set(keys)) == len(keys)
    # spot checks against the authors' text (BiLLM issue 24 quotes both as the paper's)
    billm = {(r.model, r.dataset): r.value for r in rows
             if r.paper == "BiLLM" and r.method == "billm"}
    assert billm[("llama2-7b", "wikitext2")] == 32.48 and billm[("llama2-7b", "ptb")] == 3877.38


# synthetic numbers (not the papers'): a second source for one number, another model, an fp16 row
PUBLISHED = """paper,source,model,method,dataset,metric,bits,value,note
HBLLM,"arXiv:2512.00862, Table 1",llama2-7b,hbllm_row,wikitext2,ppl,1.08,8.0,
HBLLM,"arXiv:2512.00862, Table 1",llama2-7b,hbllm_row,avgqa,acc,1.08,0.5,
HBLLM,"arXiv:2512.00862, Table 1",llama2-7b,fp16,wikitext2,ppl,16,5.0,
BiLLM,"arXiv:2402.04291, Table 3",llama2-7b,hbllm_row,wikitext2,ppl,1.08,99.0,second source: not in the report column
HBLLM,"arXiv:2512.00862, Table 1",llama2-7b,billm,wikitext2,ppl,1.08,30.0,
HBLLM,"arXiv:2512.00862, Table 1",llama-7b,hbllm_row,wikitext2,ppl,1.08,7.0,
"""


def synthetic_results(model="llama2-7b", method="hbllm_row", nsamples=128, average_metric="acc"):
    zs = {t: {"acc": 0.5, "acc_norm": 0.6, "samples": 10} for t in ZEROSHOT_TASKS}
    return {"status": "done", "model": model, "method": method,
            "config": {"model": {"name": model, "seqlen": 2048},
                       "calib": {"name": "c4", "nsamples": nsamples, "seqlen": 2048},
                       "eval": {"seqlen": 2048, "max_windows": None, "bos": False,
                                "zeroshot": {"limit": None, "num_fewshot": 0}}},
            "ppl": {"wikitext2": 10.0, "c4": 12.0}, "baseline_ppl": {"wikitext2": 5.5},
            "zeroshot": {**zs, "average": 0.55, "average_metric": average_metric},
            "bits": {"paper": 1.08, "full": 3.5}}


@pytest.fixture
def published(tmp_path, monkeypatch):
    path = tmp_path / "published.csv"
    path.write_text(PUBLISHED)
    monkeypatch.setattr(reference, "PUBLISHED_CSV", path)
    monkeypatch.setattr(reference.load, "__defaults__", (path,))
    return reference.load(path)


def test_matching_and_printed_table(published):
    res = synthetic_results()
    got = {(r.method, r.dataset, r.paper): ours for r, ours in reference.matching(res, published)}
    assert got == {("hbllm_row", "wikitext2", "HBLLM"): 10.0, ("hbllm_row", "avgqa", "HBLLM"): 0.55,
                   ("fp16", "wikitext2", "HBLLM"): 5.5, ("hbllm_row", "wikitext2", "BiLLM"): 10.0}
    cols = reference.report_columns(res, published)
    assert cols == {"pub_ppl_wikitext2": 8.0, "ratio_ppl_wikitext2": pytest.approx(10.0 / 8.0),
                    "pub_zeroshot_avg": 0.5, "ratio_zeroshot_avg": pytest.approx(0.55 / 0.5)}
    # another protocol, another model, or a differently averaged AvgQA: no comparison
    assert reference.matching(synthetic_results(nsamples=32), published) == []
    assert reference.report_columns(synthetic_results(model="opt-1.3b"), published) == {}
    norm = reference.report_columns(synthetic_results(average_metric="acc_norm_if_any"), published)
    assert "ratio_zeroshot_avg" not in norm and norm["pub_zeroshot_avg"] == 0.5
    table = format_table(res)
    assert "acc_norm piqa" in table and "average acc" in table
    below = table.split("published (same model, method and protocol):")[1]
    assert "8" in below and "ratio 1.250" in below and "arXiv:2512.00862, Table 1" in below
    assert "published" not in format_table(synthetic_results(nsamples=32))


def test_report_puts_published_next_to_matching_run(published, tmp_path):
    runs = tmp_path / "runs"
    for method in ("hbllm_row", "billm"):
        (runs / method).mkdir(parents=True)
        (runs / method / "results.json").write_text(json.dumps(synthetic_results(method=method)))
    table = build_report([runs], tmp_path / "out").set_index("method")
    assert table.loc["hbllm_row", "pub_ppl_wikitext2"] == 8.0
    assert table.loc["hbllm_row", "ratio_ppl_wikitext2"] == pytest.approx(1.25)
    assert table.loc["billm", "pub_ppl_wikitext2"] == 30.0
    assert table.loc["billm", "ratio_ppl_wikitext2"] == pytest.approx(10.0 / 30.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "published ppl wikitext2" in md and "ours/published ppl wikitext2" in md
    assert "| 8.00 |" in md and "| 1.250 |" in md

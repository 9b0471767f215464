"""hbllm-report on synthetic sweep directories and on two real tiny-llama runs of the app."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hbllm.report import build_report, main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PNG = b"\x89PNG\r\n\x1a\n"

# the cheapest real sweep: 2 runs, offline data, no W&B
TINY_SWEEP = ["experiment=ablation_shared_mean", "model=tiny-llama", "calib=wiki_sample",
              "calib.nsamples=4", "eval=quick", "eval.datasets=[wikitext2,ptb]", "eval.max_windows=2",
              f"data.local_dir={DATA}", "data.offline=true", "logger=disabled"]


def app_env() -> dict:
    """Offline, and the repo root importable (the hydra_plugins launcher lives there)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run_tiny_sweep(sweep_dir: Path, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hbllm.app", "-m", *TINY_SWEEP, f"hydra.sweep.dir={sweep_dir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=app_env(), capture_output=True, text=True, timeout=timeout)


def fake_run(run_dir: Path, overrides, method, ppl, bits, status="done", num=0, layers=3, error=None):
    """A run directory as the app and Hydra leave it (results.json + .hydra/*.yaml)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    res = {"status": status, "model": "tiny", "method": method, "config": {},
           "ppl": ppl, "bits": {"paper": bits, "full": bits + 0.7},
           "timing": {"calibration_s": 0.5, "quantize_s": 1.5 + num, "eval_s": 2.0},
           "layers": [{"index": i, "loss": 0.1 * (i + 1) * (num + 1), "time_s": 0.1, "linears": {}}
                      for i in range(layers)]}
    if error:
        res["error"] = error
    (run_dir / "results.json").write_text(json.dumps(res))
    return res


@pytest.fixture
def synthetic(tmp_path):
    """Two sweeps: block sizes (one failed run) and methods (non-numeric values, fp16 at 16 bits)."""
    bs = tmp_path / "multirun" / "ablation_blocksize" / "tiny"
    bs.mkdir(parents=True)
    (bs / "multirun.yaml").write_text("{}")
    runs = {}
    for num, b in enumerate([256, 64, 128]):
        runs[f"bs{b}"] = fake_run(bs / f"r{b}", [f"quant.blocksize={b}", "experiment=ablation_blocksize"],
                                  "hbllm_row", {"wikitext2": 100.0 + b / 7, "ptb": 200.0 + b / 3},
                                  1.0 + b / 1000, num=num)
    fake_run(bs / "r32", ["quant.blocksize=32", "experiment=ablation_blocksize"], "hbllm_row", {}, 1.0,
             status="running", error="CUDA out of memory")
    me = tmp_path / "multirun" / "methods" / "tiny"
    me.mkdir(parents=True)
    (me / "multirun.yaml").write_text("{}")
    for num, (q, bits) in enumerate([("fp16", 16.0), ("sign", 1.0), ("billm", 1.11)]):
        runs[q] = fake_run(me / q, [f"quant={q}", "experiment=methods"], q,
                           {"wikitext2": 10.0 + 30 * num + 0.123456789}, bits, num=num,
                           layers=0 if q == "fp16" else 2)
    return tmp_path / "multirun", runs


def md_tables(text: str):
    """{heading: [row dicts]} of the markdown tables under ### headings."""
    tables, head, cols = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            head, cols = line[4:], None
            tables[head] = []
        elif line.startswith("|") and head and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cols is None:
                cols = cells
            else:
                tables[head].append(dict(zip(cols, cells)))
    return tables


def test_synthetic_tables_csv_and_plots(synthetic, tmp_path):
    root, runs = synthetic
    out = tmp_path / "report"
    main([str(root), "-o", str(out)])
    text = (out / "report.md").read_text()
    assert "## ablation_blocksize/tiny" in text and "## methods/tiny" in text
    assert "3 of 4 run(s) done; swept: quant.blocksize" in text
    assert "r32`: running (CUDA out of memory)" in text
    tables = md_tables(text)
    rows = tables["quant.blocksize"]
    assert [r["quant.blocksize"] for r in rows] == ["64", "128", "256"]  # numeric order
    for r in rows:
        res = runs[f"bs{r['quant.blocksize']}"]
        assert float(r["ppl wikitext2"]) == pytest.approx(res["ppl"]["wikitext2"], abs=0.005)
        assert float(r["ppl ptb"]) == pytest.approx(res["ppl"]["ptb"], abs=0.005)
        assert float(r["bits paper"]) == pytest.approx(res["bits"]["paper"], abs=5e-4)
        assert float(r["bits full"]) == pytest.approx(res["bits"]["full"], abs=5e-4)
    assert [r["quant"] for r in tables["quant"]] == ["fp16", "sign", "billm"]  # sweep order

    csv = pd.read_csv(out / "report.csv")
    assert len(csv) == 7
    for name, res in runs.items():
        row = csv[csv["run_dir"].str.endswith("/" + (f"r{name[2:]}" if name.startswith("bs") else name))]
        assert len(row) == 1
        assert row["ppl_wikitext2"].item() == res["ppl"]["wikitext2"]  # exact, full precision
        assert row["bits_full"].item() == res["bits"]["full"]
        assert row["quantize_s"].item() == res["timing"]["quantize_s"]
    for sweep in ("ablation_blocksize_tiny", "methods_tiny"):
        for plot in ("ppl_vs_bits", "layer_loss"):
            png = out / f"{sweep}_{plot}.png"
            assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
            assert f"]({png.name})" in text


def test_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        build_report([tmp_path / "missing"], tmp_path)
    with pytest.raises(SystemExit, match="no results.json"):
        build_report([tmp_path], tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("{")
    with pytest.raises(SystemExit, match="not valid JSON"):
        build_report([tmp_path], tmp_path)


def test_wandb_offline_runs(synthetic, tmp_path):
    """--wandb reads files/results.json of offline W&B runs, swept values from config diffs."""
    _, runs = synthetic
    for q in ("sign", "billm"):
        files = tmp_path / "wb" / f"offline-run-{q}" / "files"
        files.mkdir(parents=True)
        res = dict(runs[q], config={"quant": {"method": q}, "logger": {"group": "methods-tiny"}})
        (files / "results.json").write_text(json.dumps(res))
    table = build_report([], tmp_path / "out", [tmp_path / "wb"])
    assert sorted(table["method"]) == ["billm", "sign"]
    tables = md_tables((tmp_path / "out" / "report.md").read_text())
    assert [r["quant.method"] for r in tables["quant.method"]] == ["billm", "sign"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("tiny") / "sweep"
    proc = run_tiny_sweep(sweep, "logger.mode=offline")  # W&B run files beside each run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep


def test_report_on_two_real_tiny_runs(tiny_sweep, tmp_path):
    results = {}
    for path in tiny_sweep.rglob("results.json"):
        if "wandb" in path.parts:
            continue  # the W&B runs' copies (test_report_on_real_offline_wandb_runs)
        ov = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        value = next(o.split("=")[1] for o in ov if o.startswith("quant.shared_mean="))
        results[value] = json.loads(path.read_text())
    assert sorted(results) == ["False", "True"]
    assert all(r["status"] == "done" for r in results.values())

    table = build_report([tiny_sweep], tmp_path)
    rows = md_tables((tmp_path / "report.md").read_text())["quant.shared_mean"]
    assert [r["quant.shared_mean"] for r in rows] == ["False", "True"]
    for r in rows:
        res = results[r["quant.shared_mean"]]
        assert r["method"] == res["method"]
        assert float(r["bits paper"]) == pytest.approx(res["bits"]["paper"], abs=5e-4)
        for ds in ("wikitext2", "ptb"):
            assert float(r[f"ppl {ds}"]) == pytest.approx(res["ppl"][ds], abs=0.005)
            assert float(r[f"fp16 ppl {ds}"]) == pytest.approx(res["baseline_ppl"][ds], abs=0.005)
    for _, row in table.iterrows():
        res = results[str(row["quant.shared_mean"])]
        assert row["ppl_wikitext2"] == res["ppl"]["wikitext2"]
        assert row["bits_full"] == res["bits"]["full"]
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000 for p in pngs)


def test_report_on_real_offline_wandb_runs(tiny_sweep, tmp_path):
    """--wandb finds the results.json each real offline W&B run of the app carries."""
    plain = {}
    for path in tiny_sweep.rglob("results.json"):
        if "wandb" not in path.parts:
            res = json.loads(path.read_text())
            plain[res["key"]] = res
    copies = list(tiny_sweep.rglob("files/results.json"))
    assert len(copies) == 2 and all("wandb" in p.parts for p in copies)
    table = build_report([], tmp_path, [tiny_sweep])
    assert len(table) == 2
    got = {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in copies}
    assert got == plain
    assert sorted(table["ppl_wikitext2"]) == sorted(r["ppl"]["wikitext2"] for r in plain.values())
    assert set(table["status"]) == {"done"}

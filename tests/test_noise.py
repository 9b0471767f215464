"""Noise of repeated runs: the statistics (hbllm.stats), the repeat knob's Hessian jitter, and
hbllm-report grouping seeds/repeats and flagging differences within noise."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from hbllm.jitter import EPS, jitter_hessian
from hbllm.report import build_report, main
from hbllm.results import model_key
from hbllm.stats import SIGNIFICANT, UNTESTED, WITHIN_NOISE, compare, group_key, min_p_value, summarize

PNG = b"\x89PNG\r\n\x1a\n"
SEPARATED = ([100.0, 103.0, 98.0, 101.0, 99.5], [150.0, 158.0, 147.0, 152.0, 149.0])
OVERLAPPING = ([100.0, 103.0, 98.0, 101.0, 99.5], [99.0, 104.0, 100.5, 97.0, 102.0])


def test_compare_separated_overlapping_and_too_few():
    for test in ("welch", "mannwhitney"):
        sep = compare(*SEPARATED, test=test)
        assert sep.verdict == SIGNIFICANT and sep.p < 0.01
        assert sep.ratio == pytest.approx(math.exp(sum(map(math.log, SEPARATED[1])) / 5
                                                   - sum(map(math.log, SEPARATED[0])) / 5))
        over = compare(*OVERLAPPING, test=test)
        assert over.verdict == WITHIN_NOISE and over.p > 0.5
        assert compare([100.0], [300.0], test=test).verdict == UNTESTED  # one run: no spread
    assert compare(*SEPARATED, test="mannwhitney").p == pytest.approx(2 / 252)  # exact, no overlap
    # 3 + 3 runs: the rank test cannot reach p < 0.05 (best 0.1), the t-test can
    assert min_p_value(3, 3) == pytest.approx(0.1) and min_p_value(4, 4) < 0.05
    assert compare([1, 2, 3], [7, 8, 9], test="mannwhitney").verdict == UNTESTED
    assert compare([1, 2, 3], [7, 8, 9]).verdict == SIGNIFICANT
    assert compare([1, 2, 3, 4], [7, 8, 9, 10], test="mannwhitney").verdict == SIGNIFICANT
    # repeats that did not move at all (no spread on either side)
    assert compare([5.0, 5.0], [5.0, 5.0]).verdict == WITHIN_NOISE
    assert compare([5.0, 5.0], [6.0, 6.0]).verdict == SIGNIFICANT
    with pytest.raises(ValueError, match="test must be"):
        compare([1.0], [2.0], test="ttest")


def test_summary_is_geometric_for_perplexity():
    s = summarize([10.0, 1000.0, 100.0], log=True)
    assert (s.n, s.min, s.max) == (3, 10.0, 1000.0)
    assert s.mean == pytest.approx(100.0) and s.std == pytest.approx(10.0)  # x/ 10
    a = summarize([1.0, 2.0, 3.0])
    assert a.mean == 2.0 and a.std == pytest.approx(1.0)
    assert summarize([5.0], log=True).format() == "5"
    assert s.format() == "100 (x/10, 10-1000)"
    assert summarize([]) is None


def test_group_key_ignores_only_seed_and_repeat():
    cfg = {"model": {"name": "m"}, "quant": {"method": "hbllm"}, "seed": 0, "repeat": 0,
           "logger": {"group": "g"}}
    same = [dict(cfg, seed=3), dict(cfg, repeat=2), dict(cfg, logger={"group": "other"})]
    assert {group_key(c) for c in [cfg, *same]} == {group_key(cfg)}
    assert group_key(dict(cfg, quant={"method": "billm"})) != group_key(cfg)


def test_default_repeat_keeps_old_run_keys():
    """Runs recorded before the repeat field existed keep their model key (run directory)."""
    old = {"model": {"path": "m"}, "seed": 0}
    assert model_key({**old, "repeat": 0}) == model_key(old)
    assert model_key({**old, "repeat": 1}) != model_key(old)


def test_jitter_is_tiny_symmetric_and_deterministic():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    H = 2 / 64 * x.T @ x
    assert jitter_hessian(H, 0) is H
    a, b, c = jitter_hessian(H, 1, "0.q"), jitter_hessian(H, 1, "0.q"), jitter_hessian(H, 2, "0.q")
    assert torch.equal(a, b) and not torch.equal(a, c)  # same repeat same H; another repeat not
    assert not torch.equal(a, jitter_hessian(H, 1, "0.k"))  # each linear its own draw
    assert torch.equal(a, a.T) and a.dtype == H.dtype
    rel = ((a - H).abs() / H.abs()).max().item()
    assert 0 < rel <= EPS + 2 ** -24  # plus float32 rounding of the product
    with pytest.raises(ValueError, match="repeat"):
        jitter_hessian(H, -1)


def _fake_seed_run(run_dir: Path, quant: str, seed: int, ppl: dict, bits: float) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"quant={quant}", f"seed={seed}", "experiment=seeds"]))
    config = {"model": {"name": "tiny"}, "quant": {"name": quant}, "seed": seed, "repeat": 0}
    (run_dir / "results.json").write_text(json.dumps({
        "status": "done", "model": "tiny", "method": quant, "config": config, "ppl": ppl,
        "bits": {"paper": bits, "full": bits + 2}, "timing": {"quantize_s": 1.0 + seed},
        "layers": [{"index": 0, "loss": 1.0 + seed, "time_s": 0.1, "linears": {}}]}))


@pytest.fixture
def seed_sweep(tmp_path):
    """3 configs x 5 seeds: a clearly better than b on both sets, b and c within noise."""
    sweep = tmp_path / "multirun" / "seeds" / "tiny"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    values = {"a": SEPARATED[0], "b": SEPARATED[1], "c": [151.0, 146.0, 157.0, 150.0, 153.0]}
    for quant, vals in values.items():
        for seed, v in enumerate(vals):
            _fake_seed_run(sweep / quant / f"s{seed}", quant, seed,
                           {"wikitext2": v, "ptb": 2 * v}, {"a": 1.1, "b": 1.0, "c": 1.0}[quant])
    return sweep, values


def test_report_groups_seeds_and_flags_noise(seed_sweep, tmp_path, capsys):
    sweep, values = seed_sweep
    out = tmp_path / "report"
    main([str(sweep), "-o", str(out)])
    printed = capsys.readouterr().out
    groups = pd.read_csv(out / "report_groups.csv")
    assert list(groups["method"]) == ["a", "b", "c"] and list(groups["n"]) == [5, 5, 5]
    for _, row in groups.iterrows():
        vals = values[row["method"]]
        gmean = math.exp(sum(map(math.log, vals)) / len(vals))
        assert row["ppl_wikitext2"] == pytest.approx(gmean)
        assert (row["min_ppl_wikitext2"], row["max_ppl_wikitext2"]) == (min(vals), max(vals))
        assert row["min_ppl_ptb"] == 2 * min(vals)
    cmp = pd.read_csv(out / "report_comparisons.csv")
    verdict = {(r["a"], r["b"], r["metric"]): r["verdict"] for _, r in cmp.iterrows()}
    assert verdict == {("a", "b", "ppl_wikitext2"): SIGNIFICANT, ("a", "b", "ppl_ptb"): SIGNIFICANT,
                       ("a", "c", "ppl_wikitext2"): SIGNIFICANT, ("a", "c", "ppl_ptb"): SIGNIFICANT,
                       ("b", "c", "ppl_wikitext2"): WITHIN_NOISE, ("b", "c", "ppl_ptb"): WITHIN_NOISE}
    md = (out / "report.md").read_text()
    assert "swept: quant;" in md  # seed is a repeat axis, not a swept parameter
    assert "### quant (grouped)" in md and "| quant | method | n |" in md
    gm_a = math.exp(sum(map(math.log, values["a"])) / 5)
    assert f"| a | a | 5 | 1.100 | 3.100 | {2 * gm_a:.4g} (x/1.02, 196-206) | {gm_a:.4g} (x/" in md
    assert "Welch t-test" in md and "within noise (p=" in md and "significant (p=" in md
    assert "within noise" in printed and "| a | b |" in printed  # printed, not only written
    assert (out / "seeds_tiny_ppl_vs_bits.png").read_bytes()[:8] == PNG
    main([str(sweep), "-o", str(out), "--test", "mannwhitney"])
    cmp = pd.read_csv(out / "report_comparisons.csv")
    assert set(cmp["test"]) == {"mannwhitney"}
    assert {r["verdict"] for _, r in cmp.iterrows() if r["a"] == "a"} == {SIGNIFICANT}
    assert cmp.loc[cmp["a"] == "a", "p"].tolist() == pytest.approx([2 / 252] * 4)
    assert "significant (p=0.0079)" in (out / "report.md").read_text()


def test_report_without_repeats_writes_no_group_files(seed_sweep, tmp_path):
    sweep, _ = seed_sweep
    out = tmp_path / "report"
    build_report([sweep], out)
    assert (out / "report_groups.csv").exists()
    for d in sweep.glob("*/s[1-4]"):  # one seed left per config: nothing to group
        (d / "results.json").unlink()
    build_report([sweep], out)
    assert not (out / "report_groups.csv").exists() and not (out / "report_comparisons.csv").exists()
    assert "(grouped)" not in (out / "report.md").read_text()


def test_report_logs_grouped_tables_to_wandb(seed_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep, _ = seed_sweep
    out = tmp_path / "report"
    main([str(sweep), "-o", str(out), "--log-wandb", "hbllm-test"])
    tables = {p.name.split("_")[0]: json.loads(p.read_text())
              for p in out.rglob("offline-run-*/files/media/table/*.table.json")}
    assert set(tables) == {"runs", "groups", "comparisons"}
    g = tables["groups"]
    assert {"method", "n", "ppl_wikitext2", "min_ppl_wikitext2", "max_ppl_wikitext2"} <= set(g["columns"])
    assert len(g["data"]) == 3
    c = tables["comparisons"]
    assert len(c["data"]) == 6 and "verdict" in c["columns"]


def test_seeds_preset_and_repeat_knob_on_real_tiny_runs(tmp_path):
    """`hbllm -m experiment=seeds seed=0,1 repeat=0,1`: 4 runs; the seed moves the calibration
    sample (other layer losses), a repeat only the float rounding of the Hessians (losses within
    1e-4, not bit-identical); hbllm-report makes one config of n=4."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data = root.parent / "shared" / "data"
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "hbllm.app", "-m", "experiment=seeds", "model=tiny-llama",
           "calib=wiki_sample", "calib.nsamples=4", "eval=quick", "eval.datasets=[wiki_sample]",
           "eval.max_windows=2", "eval.baseline=false", f"data.local_dir={data}",
           "data.offline=true", "logger=disabled", "seed=0,1", "repeat=0,1",
           f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = {}
    for f in sweep.rglob("results.json"):
        res = json.loads(f.read_text())
        runs[(res["config"]["seed"], res["config"]["repeat"])] = res
    assert set(runs) == {(0, 0), (0, 1), (1, 0), (1, 1)} and len({r["key"] for r in runs.values()}) == 4
    loss = {k: [layer["loss"] for layer in r["layers"]] for k, r in runs.items()}
    for seed in (0, 1):
        assert loss[(seed, 1)] != loss[(seed, 0)]  # jittered ...
        assert loss[(seed, 1)] == pytest.approx(loss[(seed, 0)], rel=1e-4)  # ... by float noise
    assert loss[(1, 0)] != pytest.approx(loss[(0, 0)], rel=1e-2)  # another calibration sample
    build_report([sweep], tmp_path / "report")
    groups = pd.read_csv(tmp_path / "report" / "report_groups.csv")
    assert list(groups["n"]) == [4] and list(groups["method"]) == ["hbllm_row"]

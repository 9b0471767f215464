"""Sweeps through submitit: a real one-node SLURM (root only) and the local launcher's failure
isolation and resume."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hbllm.report import build_report
from hbllm.slurm_local import LocalSlurm
from test_presets import CONF
from test_report import app_env, md_tables, run_tiny_sweep

# A throwaway Hydra app on the hbllm launcher presets: job "kill" dies like a job the cluster
# killed (no Python exception to report), job "raise" raises, the others write results.json.
FAKE_APP = textwrap.dedent("""
    import json, os
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path=None, config_name="cfg", version_base="1.3")
    def main(cfg):
        if cfg.mode == "kill":
            os._exit(9)
        if cfg.mode == "raise":
            raise RuntimeError("bad run")
        out = HydraConfig.get().runtime.output_dir
        json.dump({"status": "done", "mode": cfg.mode, "pid": os.getpid()},
                  open(os.path.join(out, "results.json"), "w"))

    if __name__ == "__main__":
        from hydra.core.config_store import ConfigStore
        ConfigStore.instance().store(name="cfg", node={"mode": "ok"})
        main()
""")


def _fake_sweep(tmp_path: Path, modes: str) -> subprocess.CompletedProcess:
    app = tmp_path / "fake_app.py"
    app.write_text(FAKE_APP)
    cmd = [sys.executable, str(app), "-m", f"mode={modes}", "hydra/launcher=local",
           f"hydra.searchpath=[file://{CONF}]", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           "hydra.sweep.subdir=${hydra.job.override_dirname}"]
    return subprocess.run(cmd, cwd=tmp_path, env=app_env(), capture_output=True, text=True, timeout=120)


def _results(sweep: Path):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("results.json")}


def test_failed_jobs_do_not_stop_the_sweep_and_rerun_resumes(tmp_path):
    proc = _fake_sweep(tmp_path, "kill,ok1,raise,ok2")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log  # the sweep reports the failures ...
    assert "2 of 4 job(s) failed" in log and "bad run" in log, log
    done = _results(tmp_path / "sweep")  # ... after every other job has finished
    assert sorted(done) == ["mode=ok1", "mode=ok2"]

    proc = _fake_sweep(tmp_path, "ok1,ok2,ok3")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "1 job(s) to run, 2 already finished" in log, log
    again = _results(tmp_path / "sweep")
    assert sorted(again) == ["mode=ok1", "mode=ok2", "mode=ok3"]
    assert all(again[k]["pid"] == done[k]["pid"] for k in done)  # finished runs not rerun


@pytest.fixture
def slurm(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the SLURM test installs slurm-wlm/munge and starts their daemons: run it as root")
    cluster = LocalSlurm(tmp_path / "slurm")
    try:
        cluster.start()
        yield cluster
    finally:
        pids = [p.pid for p in cluster.procs.values()]
        cluster.stop()
        for pid in pids:  # nothing it started is left running
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.slurm
def test_tiny_sweep_on_a_real_slurm(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm.env()["SLURM_CONF"])
    sweep = tmp_path / "sweep"
    proc = run_tiny_sweep(sweep, "hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug",
                          "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1",
                          "hydra.launcher.mem_gb=2", timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Submitit 'slurm': 2 job(s) to run" in log, log[-5000:]
    tasks = [p.name.split("_") for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    assert len(tasks) == 2 and len({array for array, _ in tasks}) == 1  # one job array, 2 tasks
    results = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert len(results) == 2 and all(r["status"] == "done" for r in results)
    assert sorted(r["config"]["quant"]["shared_mean"] for r in results) == [False, True]

    build_report([sweep], tmp_path / "report")
    rows = md_tables((tmp_path / "report" / "report.md").read_text())["quant.shared_mean"]
    assert sorted(float(r["ppl wikitext2"]) for r in rows) == pytest.approx(
        sorted(r["ppl"]["wikitext2"] for r in results), abs=0.005)

"""A SLURM job preempted mid-model is requeued by submitit and resumes from the first
unfinished layer, with the results of an uninterrupted run (issue 12, local one-node SLURM)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, compose
from hbllm import app
from test_report import app_env
from test_robust_runs import TINY3
from test_slurm import slurm  # noqa: F401  (the local cluster fixture)

# Loaded by every Python of the job (PYTHONPATH): each stored layer takes a few seconds more,
# so the test can preempt the job between layers.
SLOW_LAYERS = textwrap.dedent("""
    import os, time
    if os.environ.get("HBLLM_TEST_LAYER_DELAY_S"):
        import hbllm.layer_store as store
        _save = store.LayerStore.save
        def save(self, index, *a, **k):
            _save(self, index, *a, **k)
            time.sleep(float(os.environ["HBLLM_TEST_LAYER_DELAY_S"]))
        store.LayerStore.save = save
""")


def _squeue(env) -> list:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True)
    return [line.split() for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.slurm
def test_a_preempted_job_is_requeued_and_resumes_mid_model(slurm, tmp_path):  # noqa: F811
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_LAYERS)
    env = app_env()
    env.update(slurm.env(), HBLLM_TEST_LAYER_DELAY_S="4",
               PYTHONPATH=os.pathsep.join([str(hook), env["PYTHONPATH"]]))
    sweep = tmp_path / "sweep"
    # timeout_min 15: below ~12 minutes submitit reads any SIGUSR2 as the time limit
    cmd = [sys.executable, "-m", "hbllm.app", "-m", *TINY3, "logger=disabled",
           "hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug",
           "hydra.launcher.timeout_min=15", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not list(sweep.rglob("layers/layer_0000.safetensors")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-5000:]
        time.sleep(0.5)
    jobs = [j for j, state in _squeue(env) if state == "RUNNING"]
    assert len(jobs) == 1
    subprocess.run(["scancel", "--signal=USR2", jobs[0]], env=env, check=True)  # preemption
    # SLURM holds a requeued job back for a while (BeginTime); as the admin, start it now
    while proc.poll() is None and time.time() < deadline + 120:
        state = dict(_squeue(env)).get(jobs[0])
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={jobs[0]}", "StartTime=now"], env=env)
            break
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-5000:]
    [path] = list(sweep.rglob("results.json"))
    results = json.loads(path.read_text())
    assert results["status"] == "done" and results["resumed_at_layer"][0] >= 1
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert "this job is preempted" in logs and "requeu" in logs.lower(), logs[-3000:]
    whole = app.run(compose(*TINY3), tmp_path / "whole")  # uninterrupted, in this process
    assert results["ppl"] == whole["ppl"] and results["bits"] == whole["bits"]

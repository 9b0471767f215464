"""Installing hbllm as a stranger would: W&B off needs no wandb, lm-eval's private loader fails
clearly, a built wheel runs from anywhere."""
import importlib.util
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO

# The tiny run of test_app.py's console-script test, made quantizing: this package's own sources
# as calibration and evaluation text (absolute paths, so any working directory works).
SOURCES = sorted((REPO / "hbllm").glob("*.py"))
TINY_RUN = ["model=tiny-llama", "quant=sign", "logger=disabled", "device=cpu",
            "calib=text_files", "calib.files=[" + ",".join(map(str, SOURCES[::2])) + "]",
            "calib.nsamples=2", "calib.seqlen=64",
            "eval.datasets=[text_files]",
            "data.eval_files=[" + ",".join(map(str, SOURCES[1::2])) + "]",
            "eval.seqlen=64", "eval.max_windows=2"]

# As if wandb were not installed: ``import wandb`` raises ModuleNotFoundError and
# ``importlib.util.find_spec("wandb")`` (how transformers/accelerate probe for it) is None.
NO_WANDB = """
import sys
sys.modules["wandb"] = None
"""
# Then runs the app's entry point with the command-line arguments.
RUN_APP = """
from hbllm.app import main
sys.argv = ["hbllm", *sys.argv[1:]]
try:
    main()
finally:
    assert sys.modules["wandb"] is None
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_MODE")}
    return dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def _check_run(out: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "done" and results["method"] == "sign"
    assert 1 < results["ppl"]["text_files"] < 1e4
    assert not list(run_dir.rglob("wandb"))


def test_logger_disabled_runs_without_wandb(tmp_path):
    env = _env(PYTHONPATH=str(REPO))
    probe = subprocess.run([sys.executable, "-c", NO_WANDB + "import wandb"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr  # the guard works
    cmd = [sys.executable, "-c", NO_WANDB + RUN_APP, *TINY_RUN, f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    _check_run(out, tmp_path)


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_runs_from_elsewhere(tmp_path):
    """Build a wheel from a copy of the sources, install it (no dependencies: the venv sees the
    system site-packages, so nothing is downloaded) and run a tiny job from another directory."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "hbllm",
                            "hydra_plugins"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((REPO / f).read_bytes())
    wheels = tmp_path / "wheels"
    # without build isolation when setuptools is there (no download); else pip fetches it
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", str(src),
                    "-w", str(wheels)], check=True, env=_env(), timeout=300)
    [wheel] = wheels.glob("hbllm-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    # --ignore-installed: the (editable) hbllm of the system site-packages stays as it is
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, env=_env(), timeout=300)
    where = subprocess.run([str(python), "-c", "import hbllm; print(hbllm.__file__)"], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(env_dir), where
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    out = subprocess.run([str(env_dir / "bin" / "hbllm"), *TINY_RUN, f"hydra.run.dir={run_dir}"],
                         cwd=run_dir, env=_env(), capture_output=True, text=True, timeout=300)
    _check_run(out, run_dir)


def test_lm_eval_without_its_yaml_loader_fails_with_the_version_to_install(monkeypatch):
    from hbllm.tasks import local

    assert local.template("piqa")["task"] == "piqa"
    monkeypatch.setitem(sys.modules, "lm_eval.tasks._yaml_loader", None)  # as a later lm-eval
    with pytest.raises(ImportError, match=r"lm-eval==0\.4\.13"):
        local.template("piqa")

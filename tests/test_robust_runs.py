"""Runs that survive a cluster (issue 12): one writer per run directory, merged writes, the
quantized model reused when only evaluations change, resume mid-model, a bad sweep branch
failing alone, non-finite numbers named where they enter."""
import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, compose
from hbllm import app
from hbllm.results import Results, RunLock
from test_app import TINY, no_model
from test_report import app_env

TINY3 = [*TINY, "eval.baseline=false", "model.config.num_hidden_layers=3"]


def resolved(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def run_dir_of(*overrides):
    from hydra.core.hydra_config import HydraConfig

    compose(*overrides)
    return HydraConfig.get().run.dir


# 1. one writer, merged writes ----------------------------------------------------------------

def test_a_stale_writer_merges_instead_of_replacing(tmp_path):
    path = tmp_path / "results.json"
    a = Results(path, "k")
    b = Results(path, "k")  # B read the (empty) file before A finished
    a.update(status="done", ppl={"wikitext2": 7.5}, layers=[{"index": 0}, {"index": 1}])
    b.update(status="running", layers=[{"index": 0}])
    b.set_in("baseline_ppl", "wikitext2", 5.0)
    disk = json.loads(path.read_text())
    assert disk["ppl"] == {"wikitext2": 7.5}  # A's result survives B's write
    assert disk["baseline_ppl"] == {"wikitext2": 5.0}


LOCK_HOLDER = """
import sys, time
from hbllm.results import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_writer_waits_for_the_holder(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path), "3"],
                              stdout=subprocess.PIPE, text=True, env=app_env())
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.perf_counter()
    with caplog.at_level("WARNING"), RunLock(tmp_path, poll_s=0.1):
        waited = time.perf_counter() - t0
    holder.wait(10)
    assert waited > 1.0
    assert f"pid {holder.pid}" in caplog.text and "waiting" in caplog.text


def test_two_identical_runs_at_once_keep_the_finished_results(tmp_path):
    """The issue's data loss: B started while A quantizes must not overwrite A's results."""
    cmd = [sys.executable, "-m", "hbllm.app", *TINY3, "logger=disabled",
           f"hydra.run.dir={tmp_path}"]
    a = subprocess.Popen(cmd, cwd=REPO, env=app_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    b = subprocess.Popen(cmd, cwd=REPO, env=app_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out_a, out_b = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (out_a[1][-2000:], out_b[1][-2000:])
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["status"] == "done" and stored["ppl"]["text_files"] > 1
    assert len(stored["layers"]) == 3
    assert "nothing to do" in "".join(out_a + out_b)  # the second one found the work done
    assert "resumed_at_layer" not in stored  # and quantized nothing


# 2. the model keyed by what determines it ---------------------------------------------------

def test_run_directory_ignores_evaluation_device_and_logger():
    base = run_dir_of(*TINY)
    for same in ("eval.baseline=false", "eval.max_windows=2", "eval.batch_size=2", "device=cpu",
                 "eval.datasets=[]", "logger=disabled", "save_model=true", "quant.name=x"):
        assert run_dir_of(*TINY, same).split("/")[-1] == base.split("/")[-1], same
    for other in ("quant.blocksize=64", "calib.nsamples=2", "seed=1", "model.config.hidden_size=32"):
        assert run_dir_of(*TINY, other).split("/")[-1] != base.split("/")[-1], other


def test_adding_the_baseline_and_a_setting_evaluates_without_quantizing(tmp_path, monkeypatch):
    from hydra_plugins.hbllm_launcher.sweep_launcher import run_finished

    cfg = compose(*TINY3)
    first = app.run(cfg, tmp_path)
    assert first["status"] == "done" and "baseline_ppl" not in first
    assert run_finished(tmp_path, resolved(cfg))
    more = compose(*TINY3, "eval.baseline=true")
    assert not run_finished(tmp_path, resolved(more))  # the launcher would submit it ...
    monkeypatch.setattr("hbllm.pipeline.quantize_model", no_model)  # ... and it quantizes nothing
    monkeypatch.setattr("hbllm.data.get_calibration", no_model)
    again = app.run(more, tmp_path)
    assert again["baseline_ppl"]["text_files"] > 1
    assert again["ppl"] == first["ppl"] and again["layers"] == first["layers"]
    assert again["bits"] == first["bits"]
    assert run_finished(tmp_path, resolved(more)) and run_finished(tmp_path, resolved(cfg))
    # a changed evaluation setting recomputes that number only, with the stored model
    fewer = app.run(compose(*TINY3, "eval.baseline=true", "eval.max_windows=2"), tmp_path)
    assert fewer["ppl"]["text_files"] != first["ppl"]["text_files"]
    # and going back to the first setting takes the stored number again
    monkeypatch.setattr("hbllm.eval.perplexity.perplexity", no_model)
    back = app.run(more, tmp_path)
    assert back["ppl"] == first["ppl"]


# 3. resume mid-model ------------------------------------------------------------------------

def test_a_run_killed_after_a_layer_resumes_there_with_equal_results(tmp_path, monkeypatch):
    from hbllm.layer_store import LayerStore

    whole = app.run(compose(*TINY3), tmp_path / "whole")

    save = LayerStore.save

    def save_then_die(self, index, *a, **k):
        save(self, index, *a, **k)
        if index == 1:
            raise KeyboardInterrupt("preempted after layer 1")

    monkeypatch.setattr(LayerStore, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        app.run(compose(*TINY3), tmp_path / "cut")
    partial = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert partial["status"] == "running" and "ppl" not in partial
    assert len(list((tmp_path / "cut" / "layers").glob("layer_*.safetensors"))) == 2
    monkeypatch.undo()
    again = app.run(compose(*TINY3), tmp_path / "cut")
    assert again["resumed_at_layer"] == [2]
    assert again["ppl"] == whole["ppl"] and again["bits"] == whole["bits"]
    assert [r["loss"] for r in again["layers"]] == [r["loss"] for r in whole["layers"]]
    from safetensors.torch import load_file
    for i in range(3):
        a = load_file(tmp_path / "whole" / "layers" / f"layer_{i:04d}.safetensors")
        b = load_file(tmp_path / "cut" / "layers" / f"layer_{i:04d}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# 5. validation before the run directory -----------------------------------------------------

def test_a_bad_branch_of_a_sweep_fails_alone(tmp_path):
    cmd = [sys.executable, "-m", "hbllm.app", "-m", *TINY, "eval.baseline=false",
           "logger=disabled", "quant.blocksize=64,0", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=app_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    # (sign takes any positive blocksize: 0 is the bad branch)
    assert "invalid config: quant.blocksize=0 must be a positive integer" in proc.stderr
    assert "An error occurred during Hydra's exception formatting" not in proc.stderr
    done = [json.loads(p.read_text()) for p in tmp_path.rglob("results.json")]
    assert [r["config"]["quant"]["blocksize"] for r in done if r["status"] == "done"] == [64]


def test_zeroshot_tasks_without_enabled_warn(caplog):
    with caplog.at_level("WARNING"):
        app.check_config(compose(*TINY, "eval.zeroshot.tasks=[piqa]"))
    assert "eval.zeroshot.enabled=true" in caplog.text


# 4. numbers checked where they enter --------------------------------------------------------

def _tiny_llama():
    from conftest import tiny

    model, _ = tiny("tiny-llama")
    tokens = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_a_nan_weight_fails_naming_the_linear():
    from hbllm.config import QuantConfig
    from hbllm.pipeline import NonFiniteError, quantize_model

    model, tokens = _tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 "
                                             r"NaN/Inf .*checkpoint is corrupt"):
        quantize_model(model, tokens, QuantConfig(method="hbllm", blocksize=16), torch.device("cpu"))


def test_non_finite_activations_fail_naming_their_source():
    from hbllm.config import QuantConfig
    from hbllm.pipeline import NonFiniteError, quantize_model

    model, tokens = _tiny_llama()
    model.model.embed_tokens.weight.data[tokens[0, 3]] = float("inf")
    with pytest.raises(NonFiniteError, match=r"entering model\.layers\.0\.self_attn\.q_proj are "
                                             r"not finite .*the embeddings.*model\.dtype"):
        quantize_model(model, tokens, QuantConfig(method="sign"), torch.device("cpu"))


def test_linears_with_one_input_share_one_hessian():
    from hbllm.models import find_layers
    from hbllm.pipeline import capture_inputs, layer_hessians

    model, tokens = _tiny_llama()
    inputs = capture_inputs(model, tokens, torch.device("cpu"))
    H, _ = layer_hessians(find_layers(model)[1][0], inputs.hidden, inputs.kwargs[0], "cpu")
    attn, mlp = "self_attn.", "mlp."
    assert H[attn + "q_proj"] is H[attn + "k_proj"] is H[attn + "v_proj"]
    assert H[mlp + "gate_proj"] is H[mlp + "up_proj"]
    assert len({id(h) for h in H.values()}) == 4  # qkv, o, gate/up, down


def test_a_single_bad_run_prints_one_line(tmp_path):
    cmd = [sys.executable, "-m", "hbllm.app", "model=tiny-llama", "quant.blocksize=7",
           "logger=disabled", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=app_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hbllm: invalid config: quant.blocksize=7 must be even for HBLLM (Haar pairs adjacent "
        "columns inside a block)"]


def test_results_name_the_code_that_produced_them(tmp_path):
    import hbllm

    res = app.run(compose(*TINY3), tmp_path)
    code = json.loads((tmp_path / "results.json").read_text())["code"]
    assert code == res["code"]
    assert code["hbllm"] == hbllm.__version__ and code["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # tests run from a checkout: its commit is recorded
        assert code["git"] == head.stdout.strip() and isinstance(code["dirty"], bool)

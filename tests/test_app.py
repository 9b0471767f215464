"""The app end to end on a tiny random LLaMA: results.json, W&B, resume, fail-fast data errors."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose, require, wandb_logged
from hbllm import app
from hbllm.data import DataUnavailable
from hbllm.report import find_runs
from hbllm.stats import group_key

# Text for the tiny runs: this package's own sources (always there, ~100k byte tokens; the
# calibration and evaluation text are different files).
SOURCES = sorted((REPO / "hbllm").glob("*.py"))
CALIB_FILES = "[" + ",".join(str(p) for p in SOURCES[::2]) + "]"
EVAL_FILES = "[" + ",".join(str(p) for p in SOURCES[1::2]) + "]"
TINY = ["model=tiny-llama", "quant=sign", "calib=text_files", f"calib.files={CALIB_FILES}",
        "calib.nsamples=4", "calib.seqlen=64", "eval.datasets=[text_files]",
        f"data.eval_files={EVAL_FILES}", "eval.seqlen=64", "eval.max_windows=4",
        "eval.baseline=true", "logger=offline"]


def no_model(*a, **k):
    raise AssertionError("the model must not be loaded")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    results = app.run(compose(*TINY), run_dir)
    wandb_logged(run_dir)  # wait until wandb-core has written the whole run file
    return run_dir, results


@pytest.fixture
def first_run(finished, tmp_path):
    """A fresh copy of a finished run directory (tests may change its results.json)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir, symlinks=True)
    return run_dir, finished[1]


def test_run_writes_results_and_logs(first_run):
    run_dir, results = first_run
    stored = json.loads((run_dir / "results.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert stored["status"] == "done" and stored["model"] == "tiny-llama"
    assert stored["method"] == "sign" and stored["config"]["quant"]["method"] == "sign"
    ppl, base = stored["ppl"]["text_files"], stored["baseline_ppl"]["text_files"]
    assert 1 < base < 1e4 and 1 < ppl < 1e4 and ppl != base
    # sign at blocksize 128: a linear of C <= 128 input columns is one block: 1 sign bit per
    # weight + 32 bits (fp16 mean and scale) per row = 1 + 32/C. tiny-llama per layer: q, o
    # 64x64, k, v 32x64, gate, up 128x64 (C = 64); down 64x128 (C = 128)
    c64, c128 = 2 * 64 * 64 + 2 * 32 * 64 + 2 * 128 * 64, 64 * 128
    full = (c64 * (1 + 32 / 64) + c128 * (1 + 32 / 128)) / (c64 + c128)
    assert (stored["bits"]["paper"], stored["bits"]["full"]) == (1.0, pytest.approx(full, rel=1e-12))
    assert {"calibration_s", "quantize_s", "eval_s", "load_s", "total_s", "stage_capture_s",
            "stage_hessian_s", "stage_quantize_s", "stage_propagate_s"} <= set(stored["timing"])
    assert [r["index"] for r in stored["layers"]] == [0, 1]
    assert all(r["loss"] > 0 and len(r["linears"]) == 7 for r in stored["layers"])

    got = wandb_logged(run_dir)
    assert got["summary"]["ppl/text_files"] == pytest.approx(ppl)
    assert got["summary"]["baseline_ppl/text_files"] == pytest.approx(base)
    assert [h["layer/loss"] for h in got["history"] if "layer/loss" in h] == \
        pytest.approx([r["loss"] for r in stored["layers"]])
    assert any(h.get("layers/nrows") == 14 for h in got["history"])
    assert got["config"]["calib"]["nsamples"] == 4
    assert got["run"].run_group == f"tiny-llama-sign-{group_key(stored['config'])}"
    assert not any(k.startswith(("zeroshot", "baseline_zeroshot")) for k in got["summary"])
    # the final results.json travels with the W&B run (hbllm-report --wandb reads it)
    saved = [p for p in run_dir.rglob("files/results.json") if "wandb" in p.parts]
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == stored


def test_failure_is_recorded_in_results_then_cleared_by_a_rerun(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom at layer 0")

    monkeypatch.setattr("hbllm.pipeline.quantize_model", broken)
    cfg = compose(*TINY, "eval.baseline=false")
    with pytest.raises(RuntimeError, match="boom"):
        app.run(cfg, tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["status"] == "failed" and stored["error"] == "RuntimeError: boom at layer 0"
    assert "ppl" not in stored and stored["method"] == "sign"
    got = wandb_logged(tmp_path)  # the failed W&B run also carries the results
    assert got["run"] is not None
    assert [json.loads(p.read_text())["status"] for p in tmp_path.rglob("files/results.json")] == \
        ["failed"]
    monkeypatch.undo()
    again = app.run(cfg, tmp_path)
    assert again["status"] == "done" and "error" not in again
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(again))
    # each W&B run keeps the results as they were when it ended; the report takes the last
    wandb_logged(tmp_path)
    snapshots = sorted(tmp_path.rglob("files/results.json"))
    assert [json.loads(p.read_text())["status"] for p in snapshots] == ["failed", "done"]
    runs = find_runs([], [tmp_path / "wandb"])
    assert len(runs) == 1 and runs[0].results["status"] == "done"


def forbid_network(monkeypatch) -> list:
    """Make every socket connect fail and return the list of attempted addresses: failing fast
    means no network attempt at all, not a retry loop that happens to end in time."""
    connects = []

    def connect(sock, address):
        connects.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return connects


def test_zeroshot_task_data_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("hbllm.models.load_model", no_model)
    monkeypatch.setattr("hbllm.models.load_tokenizer", no_model)
    connects = forbid_network(monkeypatch)
    cfg = compose(*TINY, "eval.zeroshot.enabled=true", "eval.zeroshot.tasks=[boolq]",
                  "eval.zeroshot.local_dir=null")
    with pytest.raises(RuntimeError, match="eval.zeroshot.local_dir"):
        app.run(cfg, tmp_path)
    assert connects == []
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["status"] == "failed" and "boolq" in stored["error"]


@pytest.mark.parametrize("override", ["quant=sign", "quant=billm", "quant=fp16"])
def test_save_packed_with_an_unpackable_method_fails_before_loading(tmp_path, monkeypatch,
                                                                    override):
    monkeypatch.setattr("hbllm.models.load_model", no_model)
    monkeypatch.setattr("hbllm.models.load_tokenizer", no_model)
    with pytest.raises(ValueError, match="save_packed=true needs quant.method=hbllm"):
        app.run(compose(*TINY, override, "save_packed=true"), tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_save_packed_checks_shapes_before_quantizing(tmp_path, monkeypatch):
    monkeypatch.setattr("hbllm.pipeline.quantize_model", no_model)
    # tiny-llama's hidden size is 64: blocksize 128 does not divide in_features
    with pytest.raises(ValueError, match="in_features divisible by quant.blocksize=128"):
        app.run(compose(*TINY, "quant=hbllm_row", "save_packed=true"), tmp_path)


def test_save_packed_writes_a_loadable_packed_checkpoint(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import hbllm

    cfg = compose(*TINY, "quant=hbllm_row", "quant.blocksize=64", "save_packed=true",
                  "save_model=true", "eval.baseline=false")
    results = app.run(cfg, tmp_path)
    packed = results["packed"]
    assert packed["dir"] == "packed" and packed["linears"] == 14
    assert packed["bits_per_weight"] == pytest.approx(results["bits"]["full"], rel=0.01)
    assert json.loads((tmp_path / "results.json").read_text())["packed"] == packed
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["method"] == "hbllm_row" and len(manifest["linears"]) == 14
    assert all(name.startswith("model.layers.") for name in manifest["linears"])

    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    model = hbllm.load_packed(tmp_path / "packed")
    assert sum(isinstance(m, hbllm.packed.PackedLinear) for m in model.modules()) == 14
    assert packed["weights"] == sum(m.weight.numel() for m in fake.model.layers.modules()
                                    if isinstance(m, torch.nn.Linear))
    x = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = fake(x).logits, model(x).logits
    # equal up to the fp16 statistics of the packed format (as in tests/test_packed_model.py)
    assert ((got - want).norm() / want.norm()).item() < 2e-3
    assert (got - want).abs().max().item() < 1e-3
    got_wandb = wandb_logged(tmp_path)
    assert got_wandb["summary"]["packed/bits_per_weight"] == pytest.approx(
        packed["bits_per_weight"])


def test_rerun_of_a_finished_run_does_nothing(first_run, monkeypatch):
    run_dir, results = first_run
    monkeypatch.setattr("hbllm.models.load_model", no_model)
    monkeypatch.setattr("hbllm.models.load_tokenizer", no_model)
    assert app.run(compose(*TINY), run_dir) == json.loads(json.dumps(results))


def test_partial_run_resumes_from_stored_stages(first_run, monkeypatch):
    run_dir, results = first_run
    partial = dict(results, status="running", baseline_ppl={"text_files": 123.0})
    del partial["ppl"]
    (run_dir / "results.json").write_text(json.dumps(partial))
    again = app.run(compose(*TINY), run_dir)
    assert again["baseline_ppl"] == {"text_files": 123.0}  # kept, not recomputed
    assert again["ppl"]["text_files"] == pytest.approx(results["ppl"]["text_files"], rel=1e-6)
    assert again["status"] == "done"


def _plant_stored_baseline(run_dir):
    """Replace the stored baseline perplexity by a marker a resumed run would keep."""
    data = json.loads((run_dir / "results.json").read_text())
    data["baseline_ppl"] = {"text_files": 123.0}
    (run_dir / "results.json").write_text(json.dumps(data))
    return data["key"]


def test_changed_config_with_resume_on_starts_over(first_run):
    """Same directory, resume on (the default), another config: nothing stored is reused."""
    run_dir, results = first_run
    old_key = _plant_stored_baseline(run_dir)
    again = app.run(compose(*TINY, "quant=fp16"), run_dir)
    assert again["key"] != old_key and again["method"] == "fp16"
    assert again["baseline_ppl"]["text_files"] == pytest.approx(
        results["baseline_ppl"]["text_files"])
    assert again["ppl"] == again["baseline_ppl"] and again["layers"] == []


def test_resume_false_with_the_same_config_starts_over(first_run):
    """Same directory, same config (a finished run), resume=false: everything is recomputed."""
    run_dir, results = first_run
    old_key = _plant_stored_baseline(run_dir)
    again = app.run(compose(*TINY, "resume=false"), run_dir)
    assert again["key"] == old_key and again["status"] == "done"
    assert again["baseline_ppl"]["text_files"] == pytest.approx(
        results["baseline_ppl"]["text_files"])
    assert [r["index"] for r in again["layers"]] == [0, 1]
    assert again["ppl"]["text_files"] == pytest.approx(results["ppl"]["text_files"], rel=1e-6)


def test_saved_model_is_loadable_and_reused(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hbllm.data import get_eval_tokens
    from hbllm.eval.perplexity import perplexity
    from hbllm.models import byte_tokenizer

    cfg = compose(*TINY, "save_model=true", "eval.baseline=false")
    results = app.run(cfg, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokens = get_eval_tokens("text_files", app.validate(cfg).data, byte_tokenizer(), seqlen=64,
                             max_tokens=256)
    assert perplexity(model, tokens, 64, max_windows=4) == pytest.approx(
        results["ppl"]["text_files"], rel=1e-5)
    # a partial run with a saved model re-evaluates it without quantizing again
    data = json.loads((tmp_path / "results.json").read_text())
    data["status"] = "running"
    del data["ppl"]
    (tmp_path / "results.json").write_text(json.dumps(data))
    monkeypatch.setattr("hbllm.pipeline.quantize_model", no_model)
    again = app.run(cfg, tmp_path)
    assert again["ppl"]["text_files"] == pytest.approx(results["ppl"]["text_files"], rel=1e-5)


@pytest.mark.parametrize("override", ["calib=c4", "eval.datasets=[ptb]"])
def test_missing_data_offline_fails_fast(tmp_path, monkeypatch, override):
    monkeypatch.setattr("hbllm.models.load_model", no_model)
    connects = forbid_network(monkeypatch)
    cfg = compose(*TINY, override, "data.offline=true")
    with pytest.raises(DataUnavailable) as err:
        app.run(cfg, tmp_path)
    assert connects == []
    assert "data.local_dir" in str(err.value) or "offline" in str(err.value)


@pytest.mark.parametrize("entry", ["console_script", "module"])
def test_console_script_writes_a_hydra_run_dir(tmp_path, entry):
    beside = Path(sys.executable).parent / "hbllm"  # where pip puts it for this interpreter
    script = str(beside) if beside.is_file() else shutil.which("hbllm")
    if entry == "console_script":
        require(script is not None, f"the hbllm console script is neither at {beside} nor on "
                "PATH (pip install -e .)")
    start = [script] if entry == "console_script" else [sys.executable, "-m", "hbllm.app"]
    cmd = start + ["model=tiny-opt", "quant=fp16", "logger=disabled",
                   "eval.datasets=[text_files]", f"data.eval_files={EVAL_FILES}",
                   "eval.seqlen=64", "eval.max_windows=2", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ppl text_files" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "done" and results["method"] == "fp16"
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    bad = subprocess.run(start + ["quant.blocksize=7", f"hydra.run.dir={tmp_path}/b"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "blocksize" in bad.stderr


def test_zeroshot_results_are_stored_and_logged(tmp_path, shared_data):
    cfg = compose(*TINY, "quant=fp16", "eval.datasets=[]", "eval.zeroshot.enabled=true",
                  "eval.zeroshot.tasks=[openbookqa]", "eval.zeroshot.limit=4",
                  f"eval.zeroshot.local_dir={shared_data / 'zeroshot'}")
    results = app.run(cfg, tmp_path)
    for key in ("zeroshot", "baseline_zeroshot"):
        assert 0 <= results[key]["openbookqa"]["acc"] <= 1
        assert results[key]["average"] == pytest.approx(results[key]["openbookqa"]["acc"])
    got = wandb_logged(tmp_path)
    assert got["history"] and any("zeroshot/openbookqa/acc" in h for h in got["history"])
    assert any("baseline_zeroshot/openbookqa/acc" in h for h in got["history"])

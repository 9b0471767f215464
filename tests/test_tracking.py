"""W&B: offline run files hold what was logged; offline without an API key; run identity."""
from dataclasses import asdict

import pytest

from conftest import compose, wandb_logged
from hbllm.config import validate
from hbllm.stats import group_key
from hbllm.tracking import Tracker, effective_mode, run_identity


def test_offline_run_files_hold_the_logged_metrics(tmp_path):
    cfg = validate(compose("model=tiny-llama", "quant=hbllm_col", "logger.tags=[abl]"))
    resolved = {"model": {"name": "tiny-llama"}, "quant": {"method": "hbllm", "blocksize": 128}}
    tracker = Tracker(cfg, resolved, tmp_path, key="abc")
    assert tracker.mode == "offline"
    for i, loss in enumerate([1.5, 2.5]):
        tracker.log({"layer/index": i, "layer/loss": loss})
    tracker.log({"ppl/wikitext2": 12.25})
    tracker.table("layers", ["index", "loss"], [[0, 1.5], [1, 2.5]])
    tracker.summary({"bits/paper": 1.08})
    (tmp_path / "results.json").write_text('{"status": "done"}')
    tracker.save(tmp_path / "results.json", tmp_path)
    tracker.finish()
    (tmp_path / "results.json.new").write_text('{"status": "running"}')
    (tmp_path / "results.json.new").replace(tmp_path / "results.json")  # as Results.write does

    got = wandb_logged(tmp_path)
    rows = [h for h in got["history"] if "layer/loss" in h]
    assert [(h["layer/index"], h["layer/loss"]) for h in rows] == [(0, 1.5), (1, 2.5)]
    assert any(h.get("ppl/wikitext2") == 12.25 for h in got["history"])
    assert any(h.get("layers/nrows") == 2 for h in got["history"])
    assert got["summary"]["bits/paper"] == 1.08
    assert got["config"]["quant"] == {"method": "hbllm", "blocksize": 128}
    run = got["run"]
    assert run.display_name == "tiny-llama-hbllm_col-c4"
    assert run.run_group == f"tiny-llama-hbllm_col-{group_key(asdict(cfg))}"  # one group per config
    assert set(run.tags) == {"tiny-llama", "hbllm", "hbllm_col", "calib-c4", "abl"}
    # the saved file is the W&B run's own copy, as it was when the run ended
    [saved] = tmp_path.rglob("offline-run-*/files/results.json")
    assert saved.read_text() == '{"status": "done"}'


def test_disabled_writes_nothing(tmp_path):
    cfg = validate(compose("model=tiny-llama", "logger=disabled"))
    tracker = Tracker(cfg, {}, tmp_path, key="abc")
    tracker.log({"x": 1})
    tracker.finish()
    assert not list(tmp_path.rglob("*.wandb"))


def test_online_without_api_key_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "nope"))
    assert effective_mode("online") == "offline"
    assert effective_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert effective_mode("online") == "online"


@pytest.mark.parametrize("group,name", [(None, None), ("sweep1", "myrun")])
def test_identity_from_model_and_method(group, name):
    ov = ["model=tiny-opt", "quant=billm", "calib=wiki_sample"]
    ov += [f"logger.group={group}"] if group else []
    ov += [f"name={name}"] if name else []
    ident = run_identity(validate(compose(*ov)))
    assert ident["name"] == (name or "tiny-opt-billm-wiki_sample")
    assert ident["group"] == (group or f"tiny-opt-billm-{group_key(asdict(validate(compose(*ov))))}")


def test_identity_uses_an_explicit_quant_name():
    ident = run_identity(validate(compose("model=tiny-llama", "quant=hbllm_row", "quant.name=v2")))
    cfg = validate(compose("model=tiny-llama", "quant=hbllm_row", "quant.name=v2"))
    assert ident["name"] == "tiny-llama-v2-c4"
    assert ident["group"] == f"tiny-llama-v2-{group_key(asdict(cfg))}"
    assert {"hbllm", "v2"} <= set(ident["tags"])

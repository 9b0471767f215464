"""The config tree composes the values its presets promise: variants that inherit through
defaults lists (quant/hbllm_col = hbllm_row + layout col, eval/quick = default + ...), the
setting/ overlay shared by demo, study and ablations, the git-ignored local config, and Hydra's
settings from hydra/default.yaml. Expectations are written out here, not read from the configs."""
import dataclasses

import pytest
from omegaconf import OmegaConf

from conftest import CONF, compose
from hbllm.config import QuantConfig

# Each quant preset: the fields it sets to something other than the schema default.
QUANT = {
    "fp16": {"method": "none"},
    "sign": {"method": "sign"},
    "billm": {"method": "billm", "salient_metric": "l1"},
    "billm_b64": {"method": "billm", "salient_metric": "l1", "blocksize": 64, "name": "billm_b64"},
    "billm_b256": {"method": "billm", "salient_metric": "l1", "blocksize": 256,
                   "name": "billm_b256"},
    "hbllm_row": {"salient_metric": "l2"},
    "hbllm_col": {"salient_metric": "l2", "layout": "col"},
    "hbllm_row_shared": {"salient_metric": "l2", "shared_mean": True},
    "hbllm_col_shared": {"salient_metric": "l2", "layout": "col", "shared_mean": True},
    "hbllm_row_b64": {"salient_metric": "l2", "blocksize": 64, "name": "hbllm_row_b64"},
    "hbllm_row_b256": {"salient_metric": "l2", "blocksize": 256, "name": "hbllm_row_b256"},
    "rtn": {"method": "rtn", "wbits": 4, "groupsize": -1},
    **{f"rtn_w{b}g128": {"method": "rtn", "wbits": b, "groupsize": 128} for b in (2, 3, 4)},
    "gptq": {"method": "gptq", "wbits": 4, "groupsize": -1, "sym": False, "act_order": False,
             "static_groups": False},
    **{f"gptq_w{b}g128": {"method": "gptq", "wbits": b, "groupsize": 128, "sym": False,
                          "act_order": False, "static_groups": False} for b in (2, 3, 4)},
    "pbllm": {"method": "pbllm", "low_frac": 0.9, "high_bit": 8, "salient_metric": "hessian",
              "groupsize": -1},
    **{f"pbllm_lf{p}": {"method": "pbllm", "low_frac": p / 100, "high_bit": 8,
                        "salient_metric": "hessian", "groupsize": -1} for p in (70, 80, 95)},
}

SCHEMA = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
          for f in dataclasses.fields(QuantConfig)}

# The Gemma CPU setting (setting/gemma3_cpu): what demo, gemma3_study and the ablations share.
GEMMA_CPU = {"model.name": "gemma3-270m", "calib.name": "wiki_sample", "calib.bos": True,
             "calib.nsamples": 32, "calib.seqlen": 256, "eval.max_windows": 8, "eval.bos": True,
             "data.offline": True, "logger.mode": "offline"}
STUDY_EVAL = {"eval.datasets": ["wikitext2", "ptb", "wiki_sample"], "eval.seqlen": 512,
              "eval.baseline": False}


def _values(cfg, keys) -> dict:
    return {k: OmegaConf.to_container(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, k))
            else v for k in keys}


def test_every_quant_preset_has_an_expectation():
    assert {p.stem for p in (CONF / "quant").glob("*.yaml")} >= set(QUANT)


@pytest.mark.parametrize("preset", sorted(QUANT))
def test_quant_preset_composes_to_its_values(preset):
    quant = OmegaConf.to_container(compose(f"quant={preset}").quant)
    assert quant == {**SCHEMA, **QUANT[preset]}


def test_quant_variants_inherit_instead_of_restating():
    """hbllm_col is hbllm_row + layout col: an override of the base reaches the variant."""
    text = (CONF / "quant" / "hbllm_col.yaml").read_text()
    assert "hbllm_row" in text and "salient_metric" not in text
    cfg = compose("quant=hbllm_col", "quant.up_lim=40")
    assert cfg.quant.layout == "col" and cfg.quant.up_lim == 40


def test_eval_quick_builds_on_default():
    default = OmegaConf.to_container(compose("eval=default").eval)
    quick = OmegaConf.to_container(compose("eval=quick").eval)
    assert quick == {**default, "datasets": ["wikitext2"], "max_windows": 16, "baseline": True}
    zeroshot = OmegaConf.to_container(compose("eval=zeroshot").eval)
    assert zeroshot == {**default, "zeroshot": {**default["zeroshot"], "enabled": True}}


def test_gemma_cpu_setting_is_shared_by_demo_study_and_ablations():
    study = compose("experiment=gemma3_study")
    assert _values(study, {**GEMMA_CPU, **STUDY_EVAL}) == {**GEMMA_CPU, **STUDY_EVAL}
    demo = compose("experiment=demo")
    assert _values(demo, GEMMA_CPU) == GEMMA_CPU
    assert _values(demo, ["eval.datasets", "eval.seqlen", "eval.baseline", "quant.method"]) == {
        "eval.datasets": ["wiki_sample"], "eval.seqlen": 256, "eval.baseline": True,
        "quant.method": "hbllm"}
    assert compose("experiment=demo", "data.local_dir=/x").eval.datasets == ["wiki_sample",
                                                                            "wikitext2"]
    # an ablation preset sets only quant: with setting=gemma3_cpu it runs in the study's setting,
    # the same config as the study's hbllm_row run but for the swept field and the W&B labels
    ablation, same = (OmegaConf.to_container(compose(*o)) for o in (
        ["experiment=ablation_salient", "setting=gemma3_cpu"],
        ["experiment=gemma3_study", "quant=hbllm_row"]))
    assert ablation.pop("logger")["tags"][0] == "ablation_salient"
    assert same.pop("logger")["tags"] == ["gemma3_study"]
    assert ablation == same
    # a command-line group choice still wins over the setting's
    assert compose("setting=gemma3_cpu", "model=tiny-llama").model.name == "tiny-llama"


def test_local_config_holds_machine_paths(tmp_path, monkeypatch):
    assert compose().data.local_dir is None  # none in the tests (conftest)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text(
        "# @package _global_\ndata:\n  local_dir: /data/hbllm\n"
        "eval:\n  zeroshot:\n    local_dir: /data/zeroshot\n")
    monkeypatch.setenv("HBLLM_CONFIG_DIR", str(tmp_path))
    cfg = compose("experiment=demo")
    assert cfg.data.local_dir == "/data/hbllm" and cfg.eval.zeroshot.local_dir == "/data/zeroshot"
    assert cfg.eval.datasets == ["wiki_sample", "wikitext2"]  # the demo sees the local data
    assert compose("data.local_dir=/elsewhere").data.local_dir == "/elsewhere"  # command line wins


def test_hydra_settings_come_from_hydra_default():
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        hydra = _compose("config", return_hydra_config=True).hydra
    assert OmegaConf.to_container(hydra.run) == {"dir": "outputs/${hbllm_run_dir:}"}
    assert OmegaConf.to_container(hydra.sweep) == {"dir": "outputs",
                                                   "subdir": "${hbllm_run_dir:}"}
    assert hydra.job.chdir is False
    assert "run:" not in (CONF / "config.yaml").read_text()

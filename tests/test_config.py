"""Every preset composes and validates; typos and wrong values fail before anything loads."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import CONF, compose
from hbllm.config import RunConfig, validate

GROUPS = ["model", "calib", "quant", "eval", "logger"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    extra = ["calib.files=[a.txt]"] if option == "text_files" else []
    cfg = validate(compose(f"{group}={option}", *extra))
    assert isinstance(cfg, RunConfig)


def test_required_models_and_quant_presets_exist():
    models = set(options("model"))
    for m in ["gemma3-270m", "opt-125m", "opt-66b", "llama-7b", "llama-13b", "llama2-7b",
              "llama2-13b", "llama2-70b", "llama3-8b", "mistral-7b", "qwen2.5-7b",
              "tiny-llama", "tiny-opt"]:
        assert m in models
    assert set(options("quant")) >= {"fp16", "sign", "billm", "hbllm_row", "hbllm_col",
                                     "hbllm_row_shared", "hbllm_col_shared"}
    assert set(options("calib")) == {"c4", "wikitext2", "ptb", "wiki_sample", "text_files"}


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                                              if not p.stem.startswith("_")))
def test_every_experiment_composes(experiment):
    assert isinstance(validate(compose(f"experiment={experiment}")), RunConfig)


def test_quant_names_derive_from_the_method():
    names = {q: validate(compose(f"quant={q}")).quant.label for q in options("quant")}
    assert names == {q: q for q in options("quant")}
    assert validate(compose("quant=hbllm_row", "quant.layout=col")).quant.label == "hbllm_col"


def test_quant_name_is_kept_as_given():
    from omegaconf import OmegaConf

    assert OmegaConf.structured(RunConfig).quant.name == ""  # the schema stores no derived name
    assert validate(compose("quant=hbllm_row")).quant.name == ""
    named = validate(compose("quant=hbllm_col", "quant.name=mine")).quant
    assert (named.name, named.label) == ("mine", "mine")


@pytest.mark.parametrize("override,message", [("quant=billm", "quant.method=hbllm"),
                                              ("quant=sign", "quant.method=hbllm"),
                                              ("quant=fp16", "quant.method=hbllm"),
                                              ("quant.blocksize=96", "multiple of 64")])
def test_save_packed_rejects_unpackable_quant(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose("save_packed=true", override))
    assert validate(compose("save_packed=false", override)).save_packed is False


def test_default_is_gemma_hbllm_row():
    cfg = validate(compose())
    assert (cfg.model.name, cfg.quant.label, cfg.quant.method) == ("gemma3-270m", "hbllm_row",
                                                                  "hbllm")


def test_demo_datasets_follow_local_dir():
    assert validate(compose("experiment=demo")).eval.datasets == ["wiki_sample"]
    cfg = validate(compose("experiment=demo", "data.local_dir=/x"))
    assert cfg.eval.datasets == ["wiki_sample", "wikitext2"]
    assert cfg.calib.name == "wiki_sample" and cfg.eval.baseline and cfg.logger.mode != "online"


@pytest.mark.parametrize("override", ["quant.methd=hbllm", "model.nme=x", "calib.nsamples=many",
                                      "quant=hbllm_diag", "eval.baseline=maybe"])
def test_typos_and_wrong_types_fail_at_compose(override):
    with pytest.raises(ConfigCompositionException):
        compose(override)


@pytest.mark.parametrize("override,match", [
    ("quant.method=ternary", "quant.method"), ("quant.blocksize=7", "blocksize"),
    ("eval.datasets=[wikitext3]", "eval.datasets"), ("logger.mode=loud", "logger.mode"),
    ("model.dtype=int8", "model.dtype"), ("calib=text_files", "calib.files")])
def test_wrong_values_fail_in_validate(override, match):
    cfg = compose(override)
    with pytest.raises((ValueError, ValidationError), match=match):
        validate(cfg)


def test_run_dir_is_named_after_the_config():
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    def run_dir(*ov):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            c = _compose("config", overrides=list(ov), return_hydra_config=True)
        HydraConfig.instance().set_config(c)
        return Path(c.hydra.run.dir)

    a = run_dir("model=tiny-llama", "quant=sign")
    assert a.parts[:3] == ("outputs", "tiny-llama", "sign")
    assert run_dir("model=tiny-llama", "quant=sign") == a
    assert run_dir("model=tiny-llama", "quant=sign", "logger=disabled") == a
    assert run_dir("model=tiny-llama", "quant=sign", "calib.nsamples=3") != a

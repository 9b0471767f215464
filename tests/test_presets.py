"""Sweep presets (hbllm/conf/experiment) and launcher presets (hbllm/conf/hydra/launcher)
compose, expand to the expected jobs through Hydra's own BasicSweeper, and every job is a valid
RunConfig."""
import copy
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

import hbllm
import hbllm.app  # noqa: F401  (registers the schema and resolvers)
from hbllm.config import validate

# the app's config root, inside the package
CONF = Path(hbllm.__file__).parent / "conf"

# preset -> (swept key, its values in sweep order)
PRESETS = {
    "ablation_salient": ("quant.salient_metric", ["l2", "l1", "magnitude"]),
    "ablation_grouping": ("quant.partition", ["row", "global"]),
    "ablation_shared_mean": ("quant.shared_mean", [False, True]),
    "ablation_layout": ("quant.layout", ["row", "col"]),
    "ablation_blocksize": ("quant.blocksize", [64, 128, 256]),
    "ablation_calib": ("calib", ["c4", "wikitext2", "ptb"]),
    "methods": ("quant", ["fp16", "sign", "billm", "hbllm_row", "hbllm_col", "rtn_w3g128",
                          "gptq_w3g128", "pbllm", "arbllm_x", "arbllm_rc"]),
    "frontier": ("quant", ["fp16", "rtn_w2g128", "rtn_w3g128", "rtn_w4g128", "gptq_w2g128",
                           "gptq_w3g128", "gptq_w4g128", "pbllm_lf95", "pbllm", "pbllm_lf80",
                           "pbllm_lf70", "billm_b64", "billm", "billm_b256", "hbllm_row_b64",
                           "hbllm_row", "hbllm_row_b256", "arbllm_x", "arbllm_rc"]),
    "seeds": ("seed", [0, 1, 2, 3, 4]),
    "gemma3_study": ("quant", ["fp16", "hbllm_row", "billm", "sign", "hbllm_col",
                               "hbllm_row_shared", "hbllm_col_shared"]),
    "paper_table1": ("quant", ["fp16", "billm", "hbllm_row", "hbllm_col"]),  # test_zeroshot_paper
}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _validate(cfg):
    """The RunConfig of a composed job config (Hydra's own node removed)."""
    job = copy.deepcopy(cfg)
    with open_dict(job):
        del job["hydra"]
    return validate(job)


def expand(preset: str, cli=()):
    """Jobs of ``hbllm -m experiment=<preset> *cli`` exactly as BasicSweeper builds them."""
    cfg = _compose([f"experiment={preset}"])  # the sweep's params come from the preset
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides([*params, f"experiment={preset}", *cli])
    (batch,) = BasicSweeper.split_arguments(overrides, cfg.hydra.sweeper.max_batch_size)
    return batch


def test_every_preset_file_is_covered():
    files = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert files - {"_sweep", "demo"} == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_expands_to_valid_jobs(preset):
    key, values = PRESETS[preset]
    jobs = expand(preset, ["model=tiny-llama"])
    assert len(jobs) == len(values)
    for job, value in zip(jobs, values):
        assert f"{key}={value}" in job
        cfg = _compose(job)
        HydraConfig.instance().set_config(cfg)  # logger.group interpolates ${hydra:job.name}
        assert cfg.hydra.job.name == preset
        assert cfg.hydra.sweep.dir == f"multirun/{preset}/tiny-llama"
        assert cfg.logger.group == f"{preset}-tiny-llama"
        assert preset in cfg.logger.tags
        rc = _validate(cfg)
        assert rc.model.name == "tiny-llama"
        if key == "quant":
            assert rc.quant.label == value  # the run's display name is the method's
        elif key == "seed":
            assert rc.seed == value and rc.repeat == 0
            assert f"seed={value}" in cfg.logger.tags
        elif key == "calib":
            assert rc.calib.name == value
            assert f"calib={value}" in cfg.logger.tags
        else:
            field = key.split(".")[1]
            assert getattr(rc.quant, field) == value
            assert rc.quant.method == "hbllm"
            assert any(t.endswith(f"={value}") for t in cfg.logger.tags)


def test_model_override_multiplies_and_cli_value_wins():
    assert len(expand("ablation_blocksize", ["model=tiny-llama,tiny-opt"])) == 6
    jobs = expand("ablation_blocksize", ["model=tiny-llama", "quant.blocksize=32,512"])
    assert [j[0] for j in jobs] == ["quant.blocksize=32", "quant.blocksize=512"]


def test_method_comparison_names_and_layouts():
    got = {}
    for job in expand("methods", ["model=tiny-opt"]):
        rc = _validate(_compose(job))
        got[rc.quant.label] = (rc.quant.method, rc.quant.layout)
    assert got == {"fp16": ("none", "row"), "sign": ("sign", "row"), "billm": ("billm", "row"),
                   "hbllm_row": ("hbllm", "row"), "hbllm_col": ("hbllm", "col"),
                   "rtn_w3g128": ("rtn", "row"), "gptq_w3g128": ("gptq", "row"), "pbllm": ("pbllm", "row"),
                   "arbllm_x": ("arbllm_x", "row"), "arbllm_rc": ("arbllm_rc", "row")}


@pytest.mark.parametrize("launcher,constraint,gpus", [
    ("slurm", None, 1), ("slurm_a100", "a100", 1), ("slurm_h100", "h100", 1), ("slurm_cpu", None, None)])
def test_slurm_launcher_presets(launcher, constraint, gpus):
    from hydra.core.plugins import Plugins

    cfg = _compose([f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu",
                    "hydra.launcher.timeout_min=30", "hydra.launcher.account=proj"])
    lc = cfg.hydra.launcher
    assert lc._target_ == "hydra_plugins.hbllm_launcher.sweep_launcher.ResumingSlurmLauncher"
    assert (lc.partition, lc.timeout_min, lc.account) == ("gpu", 30, "proj")
    assert lc.constraint == constraint and lc.gpus_per_node == gpus
    Plugins.instance()  # discovers hydra_plugins.*: the launcher must be a registered plugin
    assert lc._target_ in Plugins.instance().class_name_to_class


def test_local_launcher_preset():
    lc = _compose(["hydra/launcher=local"]).hydra.launcher
    assert lc._target_.endswith("ResumingLocalLauncher")
    assert lc.submitit_folder.endswith("/.submitit/%j") and lc.gpus_per_node == 0

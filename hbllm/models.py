"""Load causal LMs (Hugging Face id, local directory, GGUF file, ``pip:<package>``, or random
init from a config) and find their decoder layers and linear sublayers generically."""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from . import hub
from .config import ModelConfig

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("HBLLM_CACHE", Path.home() / ".cache" / "hbllm"))
BYTE_TOKENIZER = "bytes"  # model.tokenizer value: a built-in byte-level tokenizer (random models)


class ModelUnavailable(RuntimeError):
    """The model (or tokenizer) cannot be loaded; the message says what to do."""


def _gguf_as_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a transformers directory under ``CACHE_DIR`` (float32
    weights + tokenizer), so later loads skip the slow dequantization."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = CACHE_DIR / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / ".complete").exists():
        return target
    log.info("Dequantizing %s once into %s (about a minute)", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:
        raise ModelUnavailable(
            f"{gguf} ({gguf.stat().st_size} bytes) could not be read as a GGUF model "
            f"({type(err).__name__}: {err}): the file is truncated or corrupt; download it "
            "again (compare its size and checksum with the source)") from err
    # the weights are plain tensors once dequantized: drop the GGUF marker so it saves normally
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").touch()
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


def resolve_path(cfg: ModelConfig) -> str:
    """A path or hub id that ``from_pretrained`` takes: GGUF files and ``pip:`` packages are
    turned into a cached transformers directory."""
    path = cfg.path
    if path.startswith("pip:"):
        package = path[4:]
        try:
            module = importlib.import_module(package)
        except ImportError as e:
            raise ModelUnavailable(f"model.path={path}: the package {package!r} is not installed; "
                                   f"pip install {package.replace('_', '-')}") from e
        path = str(module.assemble())
    p = Path(path).expanduser()
    if cfg.gguf_file:
        p = p / cfg.gguf_file
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelUnavailable(f"GGUF file {p} does not exist")
        return str(_gguf_as_dir(p))
    if p.exists():
        return str(p)
    if path.startswith((".", "/", "~")):
        raise ModelUnavailable(f"model.path={path}: no such local directory")
    return path  # a Hugging Face hub id


def byte_tokenizer():
    """A byte-level tokenizer (vocab 256 bytes + <eos>=256) needing no files, for random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _hub_error(what: str, path: str, e: Exception) -> ModelUnavailable:
    offline = hub.offline_setting()
    hint = (f"the Hugging Face hub is offline ({offline}) and it is not in the local cache"
            if offline else "it could not be downloaded")
    return ModelUnavailable(f"cannot load {what} {path!r}: {hint}. Give a local directory or a "
                            "GGUF file in model.path, or download it first with "
                            f"`hf download {path}`. ({type(e).__name__}: {e})")


def check_local_dir(path: str) -> None:
    """Raise :class:`ModelUnavailable` naming the file when a local model directory's
    ``config.json`` is not valid JSON (transformers would report the hub instead)."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelUnavailable(f"{config} is not valid JSON ({err}): the local model directory "
                               "is corrupt; restore the file (re-download or save_pretrained "
                               "the model again)") from err


def _local_error(what: str, path: str, e: Exception) -> ModelUnavailable:
    return ModelUnavailable(f"cannot load {what} from the local directory {path}: "
                            f"{type(e).__name__}: {e}. Check its files (config.json, weights, "
                            "tokenizer files) or save the model there again")


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for ``cfg`` (``model.tokenizer`` or the model's own)."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or (None if cfg.random_init else cfg.path)
    if name is None or name == BYTE_TOKENIZER:
        return byte_tokenizer()
    path = resolve_path(ModelConfig(path=name, gguf_file=None if cfg.tokenizer else cfg.gguf_file))
    local = Path(path).is_dir()
    if local:
        check_local_dir(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=bool(hub.offline_setting()),
                                             trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if local:
            raise _local_error("the tokenizer", path, e) from e
        if isinstance(e, ValueError):
            raise
        raise _hub_error("tokenizer", path, e) from e


def load_model(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """The causal LM in ``cfg.dtype`` on CPU, in eval mode, with ``use_cache`` off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    if cfg.random_init:
        config = AutoConfig.for_model(**dict(cfg.config))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        path = resolve_path(cfg)
        local = Path(path).is_dir()
        if local:
            check_local_dir(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=bool(hub.offline_setting()),
                trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            if local:
                raise _local_error("the model", path, e) from e
            if isinstance(e, ValueError):
                raise
            raise _hub_error("model", path, e) from e
    model.config.use_cache = False
    return model.eval()


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the ``nn.ModuleList`` holding the most parameters (the language
    model's layer stack for OPT, LLaMA, Mistral, Qwen2, Gemma3 ...). Returns (name, list)."""
    best, best_n = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = sum(p.numel() for p in module.parameters())
            if n > best_n:
                best, best_n = (name, module), n
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers")
    return best


def outside_layers(model: nn.Module, layers: nn.ModuleList):
    """The largest submodules that do not contain the decoder layers: embeddings, final norm,
    rotary embeddings, lm_head."""
    def walk(module: nn.Module):
        for child in module.children():
            if child is layers:
                continue
            if any(m is layers for m in child.modules()):
                yield from walk(child)
            else:
                yield child
    yield from walk(model)


def move_outside_layers(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move everything but the decoder layers to ``device`` (tied weights stay tied)."""
    for module in outside_layers(model, layers):
        module.to(device)

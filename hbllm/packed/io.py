"""Save a quantized model as a packed checkpoint and load it back as a transformers model.

Directory layout:
  ``manifest.json``        format name/version, method, quant settings, per-linear shapes, sizes
  ``linears.safetensors``  the packed tensors of every quantized linear (``<module>.<key>``)
  ``rest.safetensors``     every other parameter and buffer (embeddings, norms, biases, rotary
                           tables), tied tensors once
  ``config.json``          the transformers model config
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .codes import LinearCodes, from_quantizer
from .format import FORMAT_VERSION, TENSOR_KEYS, linear_meta, pack_linear, tensor_bytes
from .module import PackedLinear

FORMAT_NAME = "hbllm-packed"
MANIFEST = "manifest.json"
LINEARS = "linears.safetensors"
REST = "rest.safetensors"


def compress(codes, rows: int, cols: int, quant) -> tuple[dict[str, torch.Tensor], dict]:
    """``quantize_weight(..., return_codes=True).codes`` of a (rows, cols) linear -> its packed
    CPU tensors and manifest entry (what :func:`pack` stores). Call it right after quantizing
    a linear to keep ~3.9 bits/weight in memory instead of the codes' bool/float tensors."""
    if quant is None:
        raise ValueError("packing quantizer codes needs quant=<QuantConfig> (layout, blocksize)")
    lc = from_quantizer(codes, rows, cols, quant.blocksize, quant.layout, quant.haar_inverse)
    return pack_linear(lc), linear_meta(lc)


def _packed_entry(module: nn.Module, codes, quant) -> tuple[dict[str, torch.Tensor], dict]:
    rows, cols = module.weight.shape
    if isinstance(codes, tuple):
        packed, meta = codes
    elif isinstance(codes, LinearCodes):
        packed, meta = pack_linear(codes), linear_meta(codes)
    else:
        packed, meta = compress(codes, rows, cols, quant)
    if (meta["rows"], meta["cols"]) != (rows, cols):
        raise ValueError(f"codes are {meta['rows']}x{meta['cols']}, weight {rows}x{cols}")
    return packed, meta


def pack(model: nn.Module, directory: str | Path, codes: Mapping[str, object] | None = None,
         quant=None) -> dict:
    """Write ``model`` as a packed checkpoint in ``directory``; returns the size report.

    The quantized linears are the model's :class:`PackedLinear` modules plus the ``nn.Linear``
    modules named in ``codes``: ``{module name: quantize_weight(...).codes | compress(...) |
    LinearCodes}`` (quantizer codes need ``quant``, the run's QuantConfig). Report: ``{"linears", "weights",
    "linear_bytes", "bits_per_weight", "rest_bytes", "file_bytes"}`` where ``bits_per_weight``
    is the packed payload of the linears over their weight count (compare with bits["full"]).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    codes = dict(codes or {})
    modules = dict(model.named_modules())
    unknown = sorted(set(codes) - set(modules))
    if unknown:
        raise KeyError(f"codes name modules the model does not have: {unknown[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, dict] = {}
    for name, mod in modules.items():
        if isinstance(mod, PackedLinear):
            packed, meta = mod.packed, mod.meta
        elif name in codes:
            packed, meta = _packed_entry(mod, codes[name], quant)
        else:
            continue
        meta = dict(meta, bias=getattr(mod, "bias", None) is not None)
        metas[name] = meta
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
    if not metas:
        raise ValueError("nothing to pack: no PackedLinear modules and no codes given")
    rest, first, aliases = {}, {}, {}
    state = model.state_dict()
    extra = {k: v for k, v in model.named_buffers() if k not in state}  # non-persistent (rotary)
    for key, value in {**state, **extra}.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in metas and leaf != "bias":  # the packed tensors replace these
            continue
        ident = (value.data_ptr(), value.dtype, tuple(value.shape))
        if ident in first:  # tied tensors are stored once
            aliases[key] = first[ident]
            continue
        first[ident] = key
        rest[key] = value.detach().cpu().contiguous()
    save_file(tensors, str(directory / LINEARS))
    save_file(rest, str(directory / REST))
    checksums = {name: file_sha256(directory / name) for name in (LINEARS, REST)}
    if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        model.config.save_pretrained(directory)
    weights = sum(m["rows"] * m["cols"] for m in metas.values())
    linear_bytes = tensor_bytes(tensors)
    report = {"linears": len(metas), "weights": weights, "linear_bytes": linear_bytes,
              "bits_per_weight": 8.0 * linear_bytes / weights, "rest_bytes": tensor_bytes(rest),
              "file_bytes": (directory / LINEARS).stat().st_size + (directory / REST).stat().st_size}
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "method": getattr(quant, "label", None) or "hbllm",
                "quant": _quant_dict(quant), "linears": metas, "aliases": aliases, "size": report,
                "sha256": checksums}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return report


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksums(directory: Path, manifest: dict) -> None:
    """Raise ValueError naming the file whose SHA-256 differs from the manifest's (checkpoints
    written before checksums existed carry none and are not checked)."""
    for name, want in manifest.get("sha256", {}).items():
        got = file_sha256(directory / name)
        if got != want:
            raise ValueError(f"{directory / name}: SHA-256 {got[:16]}... differs from the "
                             f"manifest's {want[:16]}...: the file is corrupt or was changed "
                             "after packing; copy or write the packed checkpoint again")


def _check_shape(directory: Path, name: str, meta: dict, module: nn.Module) -> None:
    """The manifest's (rows, cols) of a linear must be the model config's."""
    want = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if (meta.get("rows"), meta.get("cols")) != want:
        raise ValueError(f"{directory / MANIFEST}: linear {name} is {meta.get('rows')}x"
                         f"{meta.get('cols')} in the manifest but {want[0]}x{want[1]} in "
                         f"{directory / 'config.json'}: the manifest does not belong to this "
                         "model config; write the packed checkpoint again")


def _quant_dict(quant) -> dict | None:
    if quant is None:
        return None
    from dataclasses import asdict, is_dataclass

    return asdict(quant) if is_dataclass(quant) else dict(quant)


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a packed checkpoint (raises on a missing file or unknown version)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a packed checkpoint (write one with hbllm.pack)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} v{manifest.get('version')!r}; "
                         f"this hbllm reads {FORMAT_NAME!r} v{FORMAT_VERSION}")
    return manifest


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def load_packed(directory: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, verify: bool = True):
    """Load a packed checkpoint as a transformers causal LM whose quantized linears are
    :class:`PackedLinear` modules on ``device``; other weights in ``dtype`` (default: as saved).

    The model skeleton is built on the meta device, so no full-precision linear is ever allocated.
    ``verify``: check the files' SHA-256 against the manifest first, and every linear's shape.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_checksums(directory, manifest)
    device = torch.device(device)
    rest = load_file(str(directory / REST), device=str(device))
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or _float_dtype(rest))
    with safe_open(str(directory / LINEARS), framework="pt") as f:
        for name, meta in manifest["linears"].items():
            _check_shape(directory, name, meta, model.get_submodule(name))
            packed = {k: f.get_tensor(f"{name}.{k}") for k in TENSOR_KEYS}
            bias = rest.get(f"{name}.bias") if meta.get("bias") else None
            try:
                linear = PackedLinear(packed, meta, bias, device=device)
            except (RuntimeError, ValueError, KeyError) as err:
                raise ValueError(f"{directory}: linear {name} does not match its manifest entry "
                                 f"({type(err).__name__}: {err}); write the packed checkpoint "
                                 "again") from err
            _set_module(model, name, linear)
    state_keys = set(model.state_dict())
    buffers = {k: v for k, v in rest.items() if k not in state_keys}
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
             for k, v in rest.items() if k in state_keys}
    model.load_state_dict(state, strict=False, assign=True)
    for key, value in buffers.items():  # non-persistent buffers keep their saved dtype
        mod, leaf = _owner(model, key)
        if leaf not in mod._buffers:
            raise ValueError(f"{directory}: tensor {key} matches no parameter or buffer")
        mod._buffers[leaf] = value
    for key, target in manifest.get("aliases", {}).items():  # tied tensors share again
        mod, leaf = _owner(model, key)
        src, src_leaf = _owner(model, target)
        kind = "_parameters" if leaf in mod._parameters else "_buffers"
        src_kind = "_parameters" if src_leaf in src._parameters else "_buffers"
        getattr(mod, kind)[leaf] = getattr(src, src_kind)[src_leaf]
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{directory}: no values for {left[:5]} (checkpoint incomplete)")
    model.eval()
    return model


def _float_dtype(rest: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding the most elements."""
    count: dict[torch.dtype, int] = {}
    for v in rest.values():
        if v.is_floating_point():
            count[v.dtype] = count.get(v.dtype, 0) + v.numel()
    return max(count, key=count.get) if count else torch.float32


def _owner(model: nn.Module, key: str):
    module_name, _, leaf = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf

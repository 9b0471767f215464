"""Layer-wise calibration: quantize a causal LM one decoder layer at a time (GPTQ protocol).

1. Run the calibration windows through the model with every decoder layer replaced by a
   recorder: keep the first layer's input hidden states and the keyword arguments each layer is
   called with (masks, position embeddings; Gemma3 differs per layer).
2. For each layer: move it to the accelerator, accumulate ``H = 2/N X^T X`` (float32, running
   average) of every quantizable weight's input with forward hooks (linears, and each MoE
   expert over exactly its routed tokens: :mod:`hbllm.weights`, :mod:`hbllm.moe`; linears fed
   the same input tensor, q/k/v and gate/up, share one Hessian), quantize each weight with
   :func:`hbllm.quantize_weight`, then recompute the layer's outputs with the quantized weights;
   they are the next layer's inputs. Only the current layer lives on the accelerator.
3. With a :class:`~hbllm.layer_store.LayerStore`, each finished layer is stored; a rerun applies
   the stored layers, running them to rebuild the next layer's inputs, and continues from the
   first unfinished one (equal results to an uninterrupted run).

Numbers are checked where they enter: a non-finite weight or Hessian, or a quantizer output that
is not finite, fails naming the layer and weight.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .jitter import jitter_hessian
from .layer_store import LayerStore
from .models import find_layers, move_outside_layers
from .weights import (
    Coverage,
    QuantWeight,
    collect_hessians,
    fill_sparse_expert_hessians,
    quantizable_weights,
    select_weights,
    unreachable,
)

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the recorder of the last layer: the rest of the forward is not needed."""


@dataclass
class LayerInputs:
    """Captured calibration state. ``hidden``: one (1, seqlen, hidden) tensor per window (the
    first layer's input); ``kwargs``: the keyword arguments of each layer's call."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _activation_device(model: nn.Module, nsamples: int, seqlen: int, device: torch.device):
    """``device`` when inputs + outputs of all windows fit in half its free memory, else CPU."""
    if device.type != "cuda":
        return device
    hidden = model.config.get_text_config().hidden_size
    itemsize = next(model.parameters()).element_size()
    need = 2 * nsamples * seqlen * hidden * itemsize
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < free / 2 else torch.device("cpu")


@torch.no_grad()
def capture_inputs(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> LayerInputs:
    """Record the first decoder layer's inputs for each window of ``tokens`` (nsamples, seqlen)
    and the keyword arguments of every layer (taken from the first window; they depend only on
    the window shape). Decoder layers stay where they are; the rest moves to ``device``."""
    _, layers = find_layers(model)
    move_outside_layers(model, layers, device)
    act_device = _activation_device(model, tokens.shape[0], tokens.shape[1], device)
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = [{} for _ in layers]

    def recorder(i):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hidden.append(h.to(act_device))
            if len(hidden) == 1:  # first window
                kwargs[i] = {k: _to(v, "cpu") for k, v in kw.items()
                             if k not in ("past_key_values", "past_key_value", "use_cache")}
                kwargs[i]["use_cache"] = False
            if i == len(layers) - 1:
                raise _Stop
            return h
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for window in tokens:
            try:
                model(window.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in layers:
            del layer.forward
        move_outside_layers(model, layers, "cpu")
    return LayerInputs(hidden, kwargs)


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict, device) -> list[torch.Tensor]:
    """The layer's output for each window (kept on each input's device)."""
    outs = []
    for h in hidden:
        out = layer(h.to(device), **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        outs.append(out.to(h.device))
    return outs


def layer_hessians(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict, device,
                   weights: list[QuantWeight] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Run ``layer`` over the calibration windows once and return ``({hessian key: H (in, in)
    float32}, {hessian key: tokens seen})`` for ``weights`` (default: every quantizable weight;
    a linear's key is its name). Linears fed the same input tensor share one Hessian object
    (:func:`hbllm.weights.collect_hessians`)."""
    weights = quantizable_weights(layer) if weights is None else weights
    return collect_hessians(layer, weights, lambda: run_layer(layer, hidden, kwargs, device))


class NonFiniteError(ValueError):
    """A weight, Hessian or quantized weight holds NaN or Inf; the message names the linear."""


def _count_bad(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def check_weight(name: str, weight: torch.Tensor, dtype: str) -> None:
    """Fail when the weight of linear ``name`` entering quantization is not finite."""
    bad = _count_bad(weight)
    if bad:
        raise NonFiniteError(
            f"{name}.weight has {bad} NaN/Inf of {weight.numel()} values before quantization: the "
            f"checkpoint is corrupt or was converted with overflow (model dtype {dtype}); "
            "re-download or re-convert the model and check it loads with finite weights")


def check_hessian(name: str, index: int, H: torch.Tensor, dtype: str) -> None:
    """Fail when the Hessian of linear ``name`` (the layer-``index`` activations) is not finite."""
    bad = _count_bad(H)
    if bad:
        source = "the embeddings" if index == 0 else f"the outputs of decoder layer {index - 1}"
        raise NonFiniteError(
            f"the calibration activations entering {name} are not finite ({bad} NaN/Inf entries "
            f"in its Hessian): {source} overflowed or hold NaN in {dtype}. Use "
            "model.dtype=bfloat16 or float32 (float16 overflows above 65504), or check the "
            "weights before this layer")


def check_quantized(name: str, res, weight: torch.Tensor) -> None:
    """Fail when quantizing finite inputs gave a non-finite weight or a NaN loss."""
    bad = _count_bad(res.weight)
    if bad or math.isnan(float(res.loss)):
        raise NonFiniteError(
            f"quantizing {name} gave {bad} NaN/Inf weights (loss {res.loss}) from a finite weight "
            f"(max |W| = {weight.abs().max().item():.3g}) and a finite Hessian: a quantizer bug; "
            "please report it with this layer name and the quant settings")


def check_reachable(layers: nn.ModuleList, selected, quant: QuantConfig) -> None:
    """Fail, naming them, when selected decoder layers hold matrices the quantizer cannot
    reach (neither ``nn.Linear`` nor a known fused-expert layout) and ``quant.skip`` does not
    leave them out."""
    bad = {i: unreachable(layers[i], quantizable_weights(layers[i]), quant.skip)
           for i in sorted(selected)}
    bad = {i: names for i, names in bad.items() if names}
    if bad:
        first = next(iter(bad))
        raise ValueError(
            f"decoder layer(s) {sorted(bad)} hold weights that {quant.label} cannot reach "
            f"(not nn.Linear, not a fused-expert tensor): layer {first}: {bad[first]}. They "
            "would stay in full precision. Leave them out on purpose with "
            "quant.skip=['<glob on the name inside a layer>'], or add support for the layout "
            "in hbllm/weights.py")


@dataclass
class QuantizeStats:
    """Outcome of :func:`quantize_model`: per-layer records (results.json ``layers``),
    numel-weighted bits per weight (:meth:`hbllm.weights.Coverage.bits`), seconds spent, stage
    timings (seconds: ``capture_s``, ``hessian_s``, ``quantize_s``, ``propagate_s``,
    ``restore_s``), the coverage report (:meth:`hbllm.weights.Coverage.report`), the layers
    taken from the store and, with ``pack``, the packed linears ``{module name: (tensors,
    manifest entry)}``."""

    layers: list[dict] = field(default_factory=list)
    bits: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    coverage: dict = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    restored: int = 0
    packed: dict[str, tuple] = field(default_factory=dict)


class _Clock:
    """Accumulates seconds per stage; synchronizes CUDA so each stage gets its own time."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.total: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, stage: str) -> float:
        self.sync()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        self.total[stage] = self.total.get(stage, 0.0) + dt
        return dt


@torch.no_grad()
def quantize_model(model: nn.Module, tokens: torch.Tensor | None, quant: QuantConfig,
                   device: torch.device,
                   on_layer: Callable[[dict], None] | None = None,
                   only: Sequence[int] | None = None,
                   on_linear: Callable[[str, object], None] | None = None,
                   return_codes: bool = False,
                   store: LayerStore | None = None,
                   pack: Callable[[object], tuple] | None = None,
                   repeat: int = 0) -> QuantizeStats:
    """Quantize every linear of every decoder layer of ``model`` (on CPU) in place, calibrating
    on ``tokens`` (nsamples, seqlen). ``on_layer`` is called with each finished layer record
    ``{"index", "loss", "time_s", "hessian_s", "quantize_s", "propagate_s", "linears": {name:
    {"loss", "bits_paper", "bits_full"}}}``.
    ``only``: indices of the layers to quantize (default all; quick experiments and tests).
    ``on_linear(name, res)`` is called after each linear with its full module name in ``model``
    and its :class:`hbllm.QuantResult` (``res.codes`` filled when ``return_codes``).
    ``store``: each finished layer is saved there, and the layers already there are applied
    instead of quantized (``tokens`` may be None when every layer is stored).
    ``pack(res) -> (tensors, manifest entry)``: compress each linear's codes (kept in the store
    and in ``stats.packed``). ``repeat`` > 0 jitters every Hessian
    (:func:`hbllm.jitter.jitter_hessian`: float-order noise only). With a method that does not
    quantize (``none``) nothing is touched."""
    from . import quantize_weight

    start = time.perf_counter()
    stats = QuantizeStats()
    if not quant.spec.quantizes:
        bits = float(next(find_layers(model)[1].parameters()).element_size() * 8)
        stats.bits = {"paper": bits, "full": bits}
        return stats
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    prefix, layers = find_layers(model)
    selected = set(range(len(layers)) if only is None else only)
    last = max(selected)
    check_reachable(layers, selected, quant)  # before any calibration work
    stored = store.count() if store is not None and only is None else 0
    clock = _Clock(device)
    coverage = Coverage()

    if stored > last:  # every layer stored: nothing to calibrate
        return restore_model(model, store, quant)
    if tokens is None:
        raise ValueError("quantize_model needs calibration tokens unless every layer is stored")
    inputs = capture_inputs(model, tokens, device)
    clock.lap("capture_s")
    hidden = inputs.hidden
    bar = tqdm(range(last + 1), desc=f"quantize {quant.label}", unit="layer")
    for i in bar:
        t0 = time.perf_counter()
        layer = layers[i].to(device)
        kwargs = _to(inputs.kwargs[i], device)
        weights = quantizable_weights(layer)
        if i < stored:  # quantized by an earlier attempt: rebuild the next layer's inputs
            _restore_layer(layer, weights, store, i, f"{prefix}.{i}", quant, coverage, stats)
            hidden = run_layer(layer, hidden, kwargs, device)
            layer.to("cpu")
            stats.restored += 1
            clock.lap("restore_s")
            continue
        if i not in selected:
            hidden = run_layer(layer, hidden, kwargs, device)
            layer.to("cpu")
            clock.lap("propagate_s")
            continue
        clock.lap("move_s")
        todo, left = select_weights(weights, quant.skip, quant.quantize_routers)
        hessians, counts = layer_hessians(layer, hidden, kwargs, device, todo)
        experts = fill_sparse_expert_hessians(todo, hessians, counts, quant.expert_min_tokens)
        if repeat:  # one jittered tensor per shared Hessian
            jittered = {id(h): jitter_hessian(h, repeat, f"{i}.{key}") for key, h in hessians.items()}
            hessians = {key: jittered[id(h)] for key, h in hessians.items()}
        record = {"index": i, "loss": 0.0, "time_s": 0.0,
                  "hessian_s": clock.lap("hessian_s"), "linears": {}}
        if experts:
            record["experts"] = experts
        checked = set()
        layer_packed = {}
        for w in todo:
            full = f"{prefix}.{i}.{w.name}"
            H = hessians[w.hessian_key]
            if id(H) not in checked:
                check_hessian(full, i, H, dtype)
                checked.add(id(H))
            W = w.get()
            check_weight(full, W, dtype)
            res = quantize_weight(W, H, quant, return_codes=return_codes or pack is not None)
            check_quantized(full, res, W)
            w.set(res.weight)
            if isinstance(w.module, nn.Linear):
                if pack is not None:
                    layer_packed[w.name] = pack(res)
                    stats.packed[full] = layer_packed[w.name]
                if on_linear is not None:
                    on_linear(full, res)
            record["linears"][w.name] = {"loss": float(res.loss),
                                         "bits_paper": res.bits["paper"],
                                         "bits_full": res.bits["full"]}
            record["loss"] += float(res.loss)
        del hessians
        record["quantize_s"] = clock.lap("quantize_s")
        hidden = run_layer(layer, hidden, kwargs, device)
        layer.to("cpu")
        record["propagate_s"] = clock.lap("propagate_s")
        record["time_s"] = time.perf_counter() - t0
        for w in todo:
            coverage.add_quantized(_bits(record["linears"][w.name]), w.numel)
        coverage.add_layer(layer, weights, {w.name for w in todo}, left)
        if store is not None and only is None:
            store.save(i, {w.name: w.get() for w in todo}, record,
                       layer_packed if pack is not None else None)
            clock.lap("store_s")
        stats.layers.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        if on_layer is not None:
            on_layer(record)
    for i, layer in enumerate(layers):
        if i not in selected:
            coverage.add_layer(layer, quantizable_weights(layer), set(), {})
    stats.bits = coverage.bits()
    stats.coverage = coverage.report()
    stats.seconds = time.perf_counter() - start
    stats.timing = clock.total
    return stats


@torch.no_grad()
def restore_model(model: nn.Module, store: LayerStore, quant: QuantConfig) -> QuantizeStats:
    """Apply every stored layer of ``store`` to ``model`` (no calibration); the stats of the
    run that quantized them (records, bits, coverage; ``packed`` when stored)."""
    start = time.perf_counter()
    prefix, layers = find_layers(model)
    if store.count() < len(layers):
        raise ValueError(f"{store.dir} holds {store.count()} of {len(layers)} quantized layers; "
                         "rerun the quantization to finish it")
    stats = QuantizeStats()
    coverage = Coverage()
    for i, layer in enumerate(layers):
        _restore_layer(layer, quantizable_weights(layer), store, i, f"{prefix}.{i}", quant,
                       coverage, stats)
    stats.restored = len(layers)
    stats.bits = coverage.bits()
    stats.coverage = coverage.report()
    stats.seconds = time.perf_counter() - start
    stats.timing = {"restore_s": stats.seconds}
    return stats


def _bits(linear_record: dict) -> dict[str, float]:
    return {"paper": linear_record["bits_paper"], "full": linear_record["bits_full"]}


def _restore_layer(layer: nn.Module, weights: list[QuantWeight], store: LayerStore, index: int,
                   name: str, quant: QuantConfig, coverage: Coverage,
                   stats: QuantizeStats) -> None:
    """Copy stored layer ``index`` into ``layer`` (shapes checked) and account for it in
    ``coverage`` and ``stats`` (record, packed linears)."""
    stored, record, packed = store.load(index)
    todo, left = select_weights(weights, quant.skip, quant.quantize_routers)
    by_name = {w.name: w for w in todo}
    if set(stored) != set(by_name):
        raise ValueError(f"the stored {name} has weights {sorted(stored)}, the model "
                         f"{sorted(by_name)}: the layers/ directory belongs to another model or "
                         "other quant.skip settings")
    for n, w in by_name.items():
        if tuple(stored[n].shape) != tuple(w.get().shape):
            raise ValueError(f"the stored {name}.{n} is {tuple(stored[n].shape)}, the model's "
                             f"{tuple(w.get().shape)}: the layers/ directory belongs to "
                             "another model")
        w.set(stored[n])
        coverage.add_quantized(_bits(record["linears"][n]), w.numel)
    coverage.add_layer(layer, weights, set(by_name), left)
    stats.layers.append(record)
    if packed is not None:
        stats.packed.update({f"{name}.{n}": p for n, p in packed.items()})

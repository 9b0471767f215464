"""Layer-wise calibration: quantize a causal LM one decoder layer at a time (GPTQ protocol).

1. Run the calibration windows through the model with every decoder layer replaced by a
   recorder: keep the first layer's input hidden states and the keyword arguments each layer is
   called with (masks, position embeddings; Gemma3 differs per layer).
2. For each layer: move it to the accelerator, accumulate ``H = 2/N X^T X`` (float32, running
   average) of every linear's input with forward hooks, quantize each linear with
   :func:`hbllm.quantize_weight`, then recompute the layer's outputs with the quantized weights;
   they are the next layer's inputs. Only the current layer lives on the accelerator.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .jitter import jitter_hessian
from .models import find_layers, find_linears, move_outside_layers

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the recorder of the last layer: the rest of the forward is not needed."""


@dataclass
class LayerInputs:
    """Captured calibration state. ``hidden``: one (1, seqlen, hidden) tensor per window (the
    first layer's input); ``kwargs``: the keyword arguments of each layer's call."""

    hidden: List[torch.Tensor]
    kwargs: List[dict]


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
    hidden: List[torch.Tensor] = []
    kwargs: List[dict] = [{} for _ in layers]

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


def run_layer(layer: nn.Module, hidden: List[torch.Tensor], kwargs: dict, device) -> List[torch.Tensor]:
    """The layer's output for each window (kept on each input's device)."""
    outs = []
    for h in hidden:
        out = layer(h.to(device), **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        outs.append(out.to(h.device))
    return outs


class HessianHook:
    """Forward hook accumulating ``H = 2/N X^T X`` (float32, running average over tokens) of a
    linear's input ``X`` (tokens, in_features)."""

    def __init__(self, linear: nn.Linear):
        self.H = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float32,
                             device=linear.weight.device)
        self.n = 0
        self.handle = linear.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x

    def remove(self) -> None:
        self.handle.remove()


def layer_hessians(layer: nn.Module, hidden: List[torch.Tensor], kwargs: dict,
                   device) -> Dict[str, torch.Tensor]:
    """``{linear name: H (in, in) float32}`` of every linear of ``layer`` over all windows."""
    hooks = {name: HessianHook(lin) for name, lin in find_linears(layer).items()}
    try:
        run_layer(layer, hidden, kwargs, device)
    finally:
        for h in hooks.values():
            h.remove()
    return {name: h.H for name, h in hooks.items()}


@dataclass
class QuantizeStats:
    """Outcome of :func:`quantize_model`: per-layer records (results.json ``layers``),
    numel-weighted bits per weight, and seconds spent."""

    layers: List[dict] = field(default_factory=list)
    bits: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@torch.no_grad()
def quantize_model(model: nn.Module, tokens: torch.Tensor, quant: QuantConfig,
                   device: torch.device,
                   on_layer: Optional[Callable[[dict], None]] = None,
                   only: Optional[Sequence[int]] = None,
                   on_linear: Optional[Callable[[str, object], None]] = None,
                   return_codes: bool = False, repeat: int = 0) -> QuantizeStats:
    """Quantize every linear of every decoder layer of ``model`` (on CPU) in place, calibrating
    on ``tokens`` (nsamples, seqlen). ``on_layer`` is called with each finished layer record
    ``{"index", "loss", "time_s", "linears": {name: {"loss", "bits_paper", "bits_full"}}}``.
    ``only``: indices of the layers to quantize (default all; quick experiments and tests).
    ``on_linear(name, res)`` is called after each linear with its full module name in ``model``
    and its :class:`hbllm.QuantResult` (``res.codes`` filled when ``return_codes``).
    ``repeat`` > 0 jitters every Hessian (:func:`hbllm.jitter.jitter_hessian`: float-order noise
    only). With ``quant.method == "none"`` nothing is touched."""
    from . import quantize_weight

    start = time.perf_counter()
    stats = QuantizeStats()
    if quant.method == "none":
        bits = float(next(find_layers(model)[1].parameters()).element_size() * 8)
        stats.bits = {"paper": bits, "full": bits}
        return stats
    prefix, layers = find_layers(model)
    selected = set(range(len(layers)) if only is None else only)
    inputs = capture_inputs(model, tokens, device)
    hidden = inputs.hidden
    total = {"paper": 0.0, "full": 0.0, "numel": 0}
    bar = tqdm(range(max(selected) + 1), desc=f"quantize {quant.label}", unit="layer")
    for i in bar:
        t0 = time.perf_counter()
        layer = layers[i].to(device)
        kwargs = _to(inputs.kwargs[i], device)
        if i not in selected:
            hidden = run_layer(layer, hidden, kwargs, device)
            layer.to("cpu")
            continue
        hessians = layer_hessians(layer, hidden, kwargs, device)
        hessians = {n: jitter_hessian(h, repeat, f"{i}.{n}") for n, h in hessians.items()}
        record = {"index": i, "loss": 0.0, "time_s": 0.0, "linears": {}}
        for name, lin in find_linears(layer).items():
            res = quantize_weight(lin.weight.data, hessians.pop(name), quant,
                                  return_codes=return_codes)
            lin.weight.data.copy_(res.weight)
            if on_linear is not None:
                on_linear(f"{prefix}.{i}.{name}", res)
            record["linears"][name] = {"loss": float(res.loss), "bits_paper": res.bits["paper"],
                                       "bits_full": res.bits["full"]}
            record["loss"] += float(res.loss)
            total["paper"] += res.bits["paper"] * res.numel
            total["full"] += res.bits["full"] * res.numel
            total["numel"] += res.numel
        hidden = run_layer(layer, hidden, kwargs, device)
        layer.to("cpu")
        record["time_s"] = time.perf_counter() - t0
        stats.layers.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        if on_layer is not None:
            on_layer(record)
    stats.bits = {"paper": total["paper"] / total["numel"], "full": total["full"] / total["numel"]}
    stats.seconds = time.perf_counter() - start
    return stats

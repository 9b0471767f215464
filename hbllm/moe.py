"""Mixture-of-experts layers as transformers ships them: fused 3-D expert tensors, their
per-expert matrices, and per-expert Hessians recorded through the model's own routing.

transformers (5.x) stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3,
OLMoE ... in one ``Experts`` module with parameters ``gate_up_proj`` ``(E, 2I, H)`` (or
``up_proj`` ``(E, I, H)`` without a gate) and ``down_proj`` ``(E, H, I)``, called as
``experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))`` after the router. The
module's flags say the layout: ``is_transposed`` (each expert stored ``(in, out)``),
``is_concatenated`` (``[gate; up]`` rows, else interleaved ``gate0, up0, gate1, ...``).

:class:`ExpertsHessians` hooks that call: for every expert ``e`` it takes exactly the tokens whose
``top_k_index`` contains ``e`` and accumulates ``H = 2/n X^T X`` of the expert's input (shared by
its gate and up matrices) and of its down projection's input ``act(gate) * up``, computed with
the module's own gate function. Memory: ``E * (H^2 + I^2)`` float32 per MoE layer (docs/moe.md).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused-experts module (3-D ``down_proj`` and ``gate_up_proj`` or
    ``up_proj`` parameters)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return (isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter)
            and down.dim() == 3 and up.dim() == 3)


def find_fused_experts(layer: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: fused experts module}`` inside one decoder layer."""
    return {name: m for name, m in layer.named_modules() if is_fused_experts(m)}


def has_gate(experts: nn.Module) -> bool:
    return isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)


def expert_matrices(experts: nn.Module) -> Iterator[tuple[str, nn.Parameter, slice, str]]:
    """For one expert, the ``(matrix name, parameter, row slice of the (out, in) view, input
    role)`` of each of its matrices; role ``in`` (the expert input) or ``mid`` (down's input).
    The fused ``gate_up_proj`` is two matrices: gate rows and up rows."""
    if has_gate(experts):
        rows = experts.gate_up_proj.shape[-1 if getattr(experts, "is_transposed", False) else -2]
        half = rows // 2
        if getattr(experts, "is_concatenated", True):
            gate, up = slice(0, half), slice(half, rows)
        else:
            gate, up = slice(0, rows, 2), slice(1, rows, 2)
        yield "gate_proj", experts.gate_up_proj, gate, "in"
        yield "up_proj", experts.gate_up_proj, up, "in"
    else:
        yield "up_proj", experts.up_proj, slice(None), "in"
    yield "down_proj", experts.down_proj, slice(None), "mid"


def expert_view(experts: nn.Module, param: nn.Parameter, e: int) -> torch.Tensor:
    """Expert ``e``'s slice of a fused parameter as an ``(out, in)`` view (writes go through)."""
    w = param.data[e]
    return w.T if getattr(experts, "is_transposed", False) else w


def _project(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Down projection's input ``(n, I)`` of expert ``e`` for its tokens ``x`` ``(n, H)``,
    computed as the experts module computes it (bias, gate function, activation)."""
    if has_gate(experts):
        w = expert_view(experts, experts.gate_up_proj, e)
        bias = experts.gate_up_proj_bias[e] if getattr(experts, "has_bias", False) else None
        return experts._apply_gate(nn.functional.linear(x, w.to(x.dtype), bias))
    w = expert_view(experts, experts.up_proj, e)
    bias = experts.up_proj_bias[e] if getattr(experts, "has_bias", False) else None
    return experts.act_fn(nn.functional.linear(x, w.to(x.dtype), bias))


def accumulate_hessian(H: torch.Tensor, n: int, x: torch.Tensor) -> None:
    """Add the rows of ``x`` (tokens, cols) to ``H = 2/n X^T X`` (float32, running average over
    the ``n`` tokens it holds so far), in place."""
    m = x.shape[0]
    H *= n / (n + m)
    x = x.float() * (2.0 / (n + m)) ** 0.5
    H += x.T @ x


class ExpertsHessians:
    """Forward pre-hook on a fused experts module: per expert, ``H = 2/n X^T X`` (float32,
    running average) over exactly the tokens routed to it, for its input (``hin[e]``) and its
    down projection's input (``hmid[e]``); ``tokens[e]`` counts them."""

    def __init__(self, experts: nn.Module, roles=("in", "mid")):
        E = experts.down_proj.shape[0]
        view = expert_view(experts, experts.down_proj, 0)  # (H, I)
        dev = experts.down_proj.device
        self.experts = experts
        self.hin = (torch.zeros(E, view.shape[0], view.shape[0], device=dev)
                    if "in" in roles else None)
        self.hmid = (torch.zeros(E, view.shape[1], view.shape[1], device=dev)
                     if "mid" in roles else None)
        self.tokens = [0] * E
        self.handle = experts.register_forward_pre_hook(self, with_kwargs=True)

    @staticmethod
    def routing(args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        names = ("hidden_states", "top_k_index")
        vals = list(args[:2]) + [kwargs[n] for n in names[len(args[:2]):]]
        return vals[0], vals[1]

    @torch.no_grad()
    def __call__(self, module, args, kwargs) -> None:
        hidden, index = self.routing(args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        # token rows grouped by expert (one host sync for the counts, not one per expert)
        flat = index.reshape(-1)
        rows = flat.argsort(stable=True) // index.shape[1]
        E = len(self.tokens)
        counts = torch.bincount(flat, minlength=E)[:E].tolist()
        start = 0
        for e, m in enumerate(counts):
            if m == 0:
                continue
            x = hidden[rows[start:start + m]]
            start += m
            n = self.tokens[e]
            if self.hin is not None:
                accumulate_hessian(self.hin[e], n, x)
            if self.hmid is not None:
                accumulate_hessian(self.hmid[e], n, _project(self.experts, x, e))
            self.tokens[e] = n + m

    def remove(self) -> None:
        self.handle.remove()


def fill_sparse_experts(hessians: list[torch.Tensor], tokens: list[int], min_tokens: int
                        ) -> list[str]:
    """Replace, in place, the Hessian of every expert with fewer than ``min_tokens`` routed
    tokens by the token-weighted mean Hessian of the layer's experts (= the Hessian of all the
    layer's routed tokens), or by the identity (data-free) when no expert saw any token.
    Returns, per expert, where its Hessian comes from: ``own`` | ``layer_mean`` | ``identity``."""
    total = sum(tokens)
    sources = []
    mean = None
    for e, n in enumerate(tokens):
        if n >= min_tokens and n > 0:
            sources.append("own")
            continue
        if total == 0:
            hessians[e].copy_(torch.eye(hessians[e].shape[0], device=hessians[e].device))
            sources.append("identity")
            continue
        if mean is None:
            mean = sum(h * (t / total) for h, t in zip(hessians, tokens))
        hessians[e].copy_(mean)
        sources.append("layer_mean")
    return sources

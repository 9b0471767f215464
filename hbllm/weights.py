"""The quantizable weights of a decoder layer, their Hessians, and the coverage report.

A :class:`QuantWeight` is one ``(out, in)`` matrix that :func:`hbllm.quantize_weight` can take:
an ``nn.Linear`` weight, one expert's gate / up / down matrix inside a fused 3-D expert tensor
(:mod:`hbllm.moe`), or a router's weight. Every weight has a kind (attention, mlp, experts,
router, other) and a Hessian key: weights reading the same input (an expert's gate and up) share
one Hessian, and so do linears called with the very same input tensor (q/k/v, gate/up).
:func:`collect_hessians` records them all in one pass over the calibration windows, the experts'
through the model's own routing.

Coverage: every parameter of the decoder is counted as quantized or full precision, by kind.
A matrix (2-D or more) that no :class:`QuantWeight` reaches fails the run (:func:`unreachable`)
unless ``quant.skip`` names it; routers stay full precision unless ``quant.quantize_routers``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from .moe import ExpertsHessians, accumulate_hessian, expert_matrices, fill_sparse_experts, find_fused_experts

KINDS = ("attention", "mlp", "experts", "router", "other")


@dataclass
class QuantWeight:
    """One quantizable ``(out, in)`` matrix of a decoder layer.

    name: inside the layer (``self_attn.q_proj``, ``mlp.experts.3.gate_proj``); kind: one of
    :data:`KINDS`; param: the parameter holding it; hessian_key: weights with the same key share
    one Hessian (same input); expert: index into a fused ``(E, ...)`` parameter, or None;
    rows: row slice of the ``(out, in)`` view; transposed: the parameter stores ``(in, out)``;
    expert_name: the expert it belongs to (experts only), e.g. ``mlp.experts.3``;
    module: the ``nn.Linear`` when the weight is a whole linear (what packing can store).
    """

    name: str
    kind: str
    param: nn.Parameter
    hessian_key: str
    expert: int | None = None
    rows: slice = field(default_factory=lambda: slice(None))
    transposed: bool = False
    expert_name: str | None = None
    module: nn.Module | None = None

    def view(self) -> torch.Tensor:
        """The ``(out, in)`` matrix as a view of the parameter (writes go through)."""
        w = self.param.data if self.expert is None else self.param.data[self.expert]
        return (w.T if self.transposed else w)[self.rows]

    def get(self) -> torch.Tensor:
        return self.view()

    def set(self, matrix: torch.Tensor) -> None:
        self.view().copy_(matrix)

    @property
    def numel(self) -> int:
        return self.view().numel()


def weight_kind(name: str) -> str:
    """The kind of a linear from its name inside the layer (``self_attn.q_proj`` attention,
    ``mlp.gate_proj`` / ``fc1`` mlp, ``block_sparse_moe.experts.3.w1`` experts, ``mlp.gate`` /
    ``shared_expert_gate`` router)."""
    parts = name.split(".")
    leaf = parts[-1]
    if "experts" in parts[:-1]:
        return "experts"
    if leaf in ("gate", "router") or "router" in leaf or leaf.endswith("expert_gate"):
        return "router"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in ("fc1", "fc2") or "mlp" in p or "ffn" in p or "feed_forward" in p
           or "shared_expert" in p for p in parts):
        return "mlp"
    return "other"


def _is_router(name: str, module: nn.Module) -> bool:
    """A router that is not an ``nn.Linear``: transformers' ``*TopKRouter`` modules holding a
    2-D ``weight`` (experts, hidden) applied as ``F.linear`` to their input."""
    w = getattr(module, "weight", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 2
            and ("router" in type(module).__name__.lower() or weight_kind(name) == "router"))


def quantizable_weights(layer: nn.Module) -> list[QuantWeight]:
    """Every matrix of one decoder layer that the quantizer can reach, in module order."""
    fused = find_fused_experts(layer)
    weights: list[QuantWeight] = []
    for name, module in layer.named_modules():
        if name in fused:
            transposed = bool(getattr(module, "is_transposed", False))
            for e in range(module.down_proj.shape[0]):
                for matrix, param, rows, role in expert_matrices(module):
                    weights.append(QuantWeight(
                        f"{name}.{e}.{matrix}", "experts", param, f"{name}.{e}:{role}",
                        expert=e, rows=rows, transposed=transposed, expert_name=f"{name}.{e}"))
        elif isinstance(module, nn.Linear):
            kind = weight_kind(name)
            weights.append(QuantWeight(
                name, kind, module.weight, name, module=module,
                expert_name=name.rpartition(".")[0] if kind == "experts" else None))
        elif _is_router(name, module):
            weights.append(QuantWeight(name, "router", module.weight, name, module=module))
    return weights


def _skipped(name: str, skip: Sequence[str]) -> str | None:
    return next((p for p in skip if fnmatchcase(name, p)), None)


def select_weights(weights: list[QuantWeight], skip: Sequence[str], quantize_routers: bool
                   ) -> tuple[list[QuantWeight], dict[str, str]]:
    """Split ``weights`` into those to quantize and ``{name: why it stays full precision}``
    (``quant.skip <pattern>`` or ``router``)."""
    todo, left = [], {}
    for w in weights:
        pattern = _skipped(w.name, skip)
        if pattern is not None:
            left[w.name] = f"quant.skip {pattern}"
        elif w.kind == "router" and not quantize_routers:
            left[w.name] = "router (quant.quantize_routers=false)"
        else:
            todo.append(w)
    return todo, left


def is_matrix(name: str, p: torch.Tensor) -> bool:
    """A weight matrix: 2 or more dimensions, not a bias (fused experts keep their biases as
    ``(E, out)`` tensors named ``*_bias``)."""
    leaf = name.rpartition(".")[2]
    return p.dim() >= 2 and leaf != "bias" and not leaf.endswith("_bias")


def unreachable(layer: nn.Module, weights: list[QuantWeight], skip: Sequence[str]) -> list[str]:
    """``name (shape)`` of each matrix parameter (:func:`is_matrix`) of ``layer`` that no weight
    in ``weights`` covers and ``skip`` does not name (matched on the parameter's name and on its
    module's name)."""
    covered = {id(w.param) for w in weights}
    return [f"{n} {tuple(p.shape)}" for n, p in layer.named_parameters()
            if is_matrix(n, p) and id(p) not in covered
            and _skipped(n, skip) is None and _skipped(n.rpartition(".")[0], skip) is None]


class InputHessian:
    """``H = 2/N X^T X`` (float32, running average over tokens) of the inputs ``X`` (tokens, cols)
    of ``module`` (applying a 2-D ``weight``) given to :meth:`add`."""

    def __init__(self, module: nn.Module):
        w = module.weight
        self.H = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float32, device=w.device)
        self.n = 0

    def add(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1])
        accumulate_hessian(self.H, self.n, x)
        self.n += x.shape[0]


class SharedInputHessians:
    """Forward hooks on ``modules`` ``{name: module applying a 2-D weight}`` inside ``layer``:
    one :class:`InputHessian` per distinct input tensor. A module called with the very tensor an
    earlier module got in the same forward of ``layer`` (q/k/v on the normed hidden states,
    gate/up) shares that module's accumulator; the sharing seen in the first window must hold
    in every window."""

    def __init__(self, layer: nn.Module, modules: dict[str, nn.Module]):
        self.modules = modules
        self.owner: dict[str, str] = {}  # module -> the module whose accumulator it uses
        self.acc: dict[str, InputHessian] = {}
        self._window: list[tuple] = []  # (input tensor, owner) of the current forward
        self._windows = 0
        self.handles = [layer.register_forward_pre_hook(self._new_window)]
        for name, module in modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name, module)))

    def _new_window(self, module, args) -> None:
        self._window = []
        self._windows += 1

    def _hook(self, name: str, module: nn.Module):
        def hook(mod, inputs, output) -> None:
            x = inputs[0]
            owner = next((o for t, o in self._window if t is x), name)
            if self._windows == 1:
                self.owner[name] = owner
            elif self.owner.get(name) != owner:
                raise RuntimeError(f"{name} shared its input with {self.owner.get(name)} in the "
                                   f"first calibration window but not in window {self._windows}")
            if owner == name:
                if name not in self.acc:
                    self.acc[name] = InputHessian(module)
                self.acc[name].add(x)
                self._window.append((x, name))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._window = []

    def hessians(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """``({module: H}, {module: tokens})``; modules sharing an input share the tensor, a
        module never called (an expert no token was routed to) gets zeros and 0 tokens."""
        for name, module in self.modules.items():
            if name not in self.owner:
                self.owner[name] = name
                self.acc[name] = InputHessian(module)
        return ({n: self.acc[o].H for n, o in self.owner.items()},
                {n: self.acc[o].n for n, o in self.owner.items()})


@torch.no_grad()
def collect_hessians(layer: nn.Module, weights: list[QuantWeight], forward: Callable[[], object]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Run ``forward()`` (the layer over the calibration windows) once with hooks and return
    ``({hessian key: H (in, in) float32}, {hessian key: tokens seen})`` for ``weights``.
    An expert's Hessian holds exactly the tokens the model routed to it."""
    keys = {w.hessian_key for w in weights}
    modules = dict(layer.named_modules())
    linear_hooks = SharedInputHessians(layer, {k: modules[k] for k in keys if k in modules})
    expert_hooks = {}
    for name, experts in find_fused_experts(layer).items():
        roles = tuple(r for r in ("in", "mid") if any(k.startswith(f"{name}.") and
                                                      k.endswith(f":{r}") for k in keys))
        if roles:
            expert_hooks[name] = ExpertsHessians(experts, roles)
    try:
        forward()
    finally:
        for h in [linear_hooks, *expert_hooks.values()]:
            h.remove()
    hessians, tokens = linear_hooks.hessians()
    for name, h in expert_hooks.items():
        for e, n in enumerate(h.tokens):
            for role, H in (("in", h.hin), ("mid", h.hmid)):
                if H is not None:
                    hessians[f"{name}.{e}:{role}"] = H[e]
                    tokens[f"{name}.{e}:{role}"] = n
    return hessians, tokens


def fill_sparse_expert_hessians(weights: list[QuantWeight], hessians: dict[str, torch.Tensor],
                                tokens: dict[str, int], min_tokens: int) -> dict[str, dict]:
    """Give every expert with fewer than ``min_tokens`` routed tokens the mean Hessian of the
    layer's experts with the same role (:func:`hbllm.moe.fill_sparse_experts`), in place.
    Returns per expert ``{"tokens": n, "hessian": "own" | "layer_mean" | "identity"}``."""
    groups: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for w in weights:
        if w.kind != "experts" or w.hessian_key in owner:
            continue
        owner[w.hessian_key] = w.expert_name
        # the same role in every expert: key with the expert index replaced
        role = re.sub(r"\.\d+([.:])", r".*\1", w.hessian_key)
        groups.setdefault(role, []).append(w.hessian_key)
    record: dict[str, dict] = {}
    for keys in groups.values():
        sources = fill_sparse_experts([hessians[k] for k in keys], [tokens[k] for k in keys],
                                      min_tokens)
        for k, src in zip(keys, sources):
            rec = record.setdefault(owner[k], {"tokens": tokens[k], "hessian": src})
            if src != "own":
                rec["hessian"] = src
    return record


def param_bits(p: torch.Tensor) -> float:
    """Bits per weight of a parameter kept in full precision: its storage width."""
    return float(p.element_size() * 8)


class Coverage:
    """Counts decoder parameters quantized vs left in full precision, by kind, and their bits.

    ``add_layer`` once per decoder layer; ``add_quantized`` for each quantized weight's bits."""

    def __init__(self):
        self.by_kind = {k: {"quantized": 0, "full_precision": 0} for k in KINDS}
        self.left: dict[str, str] = {}
        self.fp_bits = 0.0
        self.q_bits = {"paper": 0.0, "full": 0.0}
        self.q_numel = 0
        self.matrices = 0  # numel of every matrix parameter (:func:`is_matrix`) of the decoder

    def add_layer(self, layer: nn.Module, weights: list[QuantWeight], quantized: set,
                  left: dict[str, str]) -> None:
        """Count every parameter of ``layer``: the weights named in ``quantized`` as quantized,
        the other weights and every remaining parameter (norms, biases) as full precision."""
        covered: dict[int, int] = {}
        for w in weights:
            slot = "quantized" if w.name in quantized else "full_precision"
            self.by_kind[w.kind][slot] += w.numel
            covered[id(w.param)] = covered.get(id(w.param), 0) + w.numel
            if slot == "full_precision":
                self.fp_bits += w.numel * param_bits(w.param)
        for name, p in layer.named_parameters():
            if is_matrix(name, p):
                self.matrices += p.numel()
            rest = p.numel() - covered.get(id(p), 0)
            if rest:
                self.by_kind["other"]["full_precision"] += rest
                self.fp_bits += rest * param_bits(p)
        self.left.update(left)

    def add_quantized(self, bits: dict[str, float], numel: int) -> None:
        self.q_bits["paper"] += bits["paper"] * numel
        self.q_bits["full"] += bits["full"] * numel
        self.q_numel += numel

    def bits(self) -> dict[str, float]:
        """Bits per weight: ``paper`` / ``full`` over the quantized weights, ``decoder_paper`` /
        ``decoder_full`` over every decoder parameter (full-precision ones at their width)."""
        total = sum(v for d in self.by_kind.values() for v in d.values())
        out = {}
        if self.q_numel:
            out = {k: v / self.q_numel for k, v in self.q_bits.items()}
        if total:
            out.update({f"decoder_{k}": (v + self.fp_bits) / total for k, v in self.q_bits.items()})
        return out

    def report(self) -> dict:
        """results.json ``coverage``: per kind ``{"quantized", "full_precision"}`` parameter
        counts, totals, the quantized fraction of the decoder parameters and of its matrices
        (:func:`is_matrix`: norms and biases excluded), and ``left_full_precision``
        ``{weight name in a layer: reason}``."""
        q = sum(d["quantized"] for d in self.by_kind.values())
        total = sum(v for d in self.by_kind.values() for v in d.values())
        matrices = self.matrices
        return {"by_kind": self.by_kind, "quantized": q, "full_precision": total - q,
                "fraction": q / total if total else 0.0,
                "matrix_fraction": q / matrices if matrices else 0.0,
                "left_full_precision": self.left}

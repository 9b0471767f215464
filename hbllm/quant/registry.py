"""The method registry: everything the framework knows about a quantization method, in one place.

A :class:`Method` declares its quantizer (a block quantizer run by the shared GPTQ block loop, or
its own column loop), its bit accounting in both conventions, its method-specific
:class:`~hbllm.config.QuantConfig` fields with their defaults and checks, its display name, and
whether packed checkpoints support it. Config, pipeline, app and the packed format ask the
registry; none of them compares method names. Adding a method: its module, its
:func:`register` line in ``hbllm/quant/methods.py``, one ``hbllm/conf/quant/*.yaml``
(docs/quantizers.md).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch


class Codes(Protocol):
    """What a packed checkpoint would store for one quantized span of columns (a block, or the
    whole weight for column-loop methods). ``salient``: column indices inside the span (k,)."""

    salient: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The span's quantized values, float32 ``(rows, width)``."""

    def stored_bits(self) -> int:
        """Bits of the codes as stored, counted from the tensors themselves."""


class LoopOutput(NamedTuple):
    """What a column loop returns: the quantized weight ``(rows, cols)`` float32, the GPTQ loss
    per row ``(rows,)`` and the codes of its spans (in column order)."""

    weight: torch.Tensor
    row_loss: torch.Tensor
    codes: list[Codes]


# block quantizer: (w (R, C) float32, d = diag(U) of its columns (C,), cfg) -> (q (R, C), codes);
# with Method.block_hessian, a 4th argument S (C, C): the block's slice of the undamped Hessian
BlockQuantizer = Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Codes]]
# column loop: (W (R, C) float32 copy, H (C, C) float32 copy, cfg) -> LoopOutput
ColumnLoop = Callable[[torch.Tensor, torch.Tensor, Any], LoopOutput]


def _no_check(*_args) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """One quantization method.

    name: the ``quant.method`` value.  block / loop: exactly one of them (see module docstring).
    bits(cfg, codes) -> (paper, full): bit counts of one span from the method's formula
    (docs/quantizers.md); tests check ``full == codes.stored_bits()``.
    fields: the method-specific QuantConfig fields it uses and their defaults; any other of them
    left set is an error.  check(cfg): raise ValueError for invalid field values or combinations.
    check_shape(rows, cols, cfg): raise ValueError for weights the method cannot quantize.
    block_hessian: the block quantizer also takes ``S = H[s:e, s:e]`` ``(C, C)``, its block's slice
    of the raw (undamped) Hessian.  label(cfg): the display name.  packable: packed checkpoints
    (docs/packed.md) support it.
    quantizes: False only for the full-precision pass-through.
    """

    name: str
    label: Callable[[Any], str]
    bits: Callable[[Any, Codes], tuple[int, int]] | None = None
    block: BlockQuantizer | None = None
    loop: ColumnLoop | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Any], None] = _no_check
    check_shape: Callable[[int, int, Any], None] = _no_check
    packable: bool = False
    quantizes: bool = True
    block_hessian: bool = False

    def __post_init__(self) -> None:
        if self.quantizes and (self.block is None) == (self.loop is None):
            raise ValueError(f"method {self.name!r} must give exactly one of block= or loop=")
        if self.quantizes and self.bits is None:
            raise ValueError(f"method {self.name!r} must give its bit accounting (bits=)")


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _load() -> None:
    from . import methods  # noqa: F401  (registers every built-in method)


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the known ones otherwise."""
    _load()
    if name not in _METHODS:
        raise ValueError(f"quant.method={name!r} is not one of {sorted(_METHODS)}")
    return _METHODS[name]


def method_names() -> list[str]:
    _load()
    return sorted(_METHODS)


def method_fields() -> list[str]:
    """Every method-specific QuantConfig field some registered method declares."""
    _load()
    return sorted({f for m in _METHODS.values() for f in m.fields})


def at_defaults(cfg) -> bool:
    """Whether every method-specific field of ``cfg`` holds its method's default (labels then
    use the bare method name)."""
    return all(getattr(cfg, f) == v for f, v in cfg.spec.fields.items())

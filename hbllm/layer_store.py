"""What each quantized decoder layer produced, stored as it finishes, so a run resumes mid-model.

``<run dir>/layers/layer_<i>.safetensors`` holds the quantized weights of layer i's linears
(``<linear>.weight``, in the model's dtype: exactly the values the run continued with), the
layer's record (``metadata["record"]``, JSON) and, when the run packs, the packed tensors
(``packed.<linear>.<tensor>``, manifest entries in ``metadata["packed"]``). Each file is written
to a temporary name and renamed, so a file that exists is complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PACKED = "packed."


class LayerStore:
    """The ``layers/`` directory of a run."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def path(self, index: int) -> Path:
        return self.dir / f"layer_{index:04d}.safetensors"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def count(self) -> int:
        """Number of consecutive stored layers from layer 0."""
        n = 0
        while self.has(n):
            n += 1
        return n

    def save(self, index: int, weights: dict[str, torch.Tensor], record: dict,
             packed: dict[str, tuple[dict[str, torch.Tensor], dict]] | None = None) -> None:
        """Store layer ``index``: ``weights`` {linear name: weight}, its ``record`` and, when
        packing, ``packed`` {linear name: (packed tensors, manifest entry)}; atomically."""
        from safetensors.torch import save_file

        from .results import dumps

        tensors = {f"{n}.weight": w.detach().to("cpu").contiguous() for n, w in weights.items()}
        meta = {"record": dumps(record)}
        if packed is not None:
            for name, (tens, _) in packed.items():
                tensors.update({f"{PACKED}{name}.{k}": v.contiguous() for k, v in tens.items()})
            meta["packed"] = json.dumps({n: entry for n, (_, entry) in packed.items()})
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path(index).with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.path(index))

    def load(self, index: int):
        """``(weights, record, packed or None)`` of a stored layer (see :meth:`save`)."""
        from safetensors import safe_open

        path = self.path(index)
        weights, packed_tensors = {}, {}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                for key in f.keys():
                    if key.startswith(PACKED):
                        packed_tensors[key[len(PACKED):]] = f.get_tensor(key)
                    else:
                        weights[key[: -len(".weight")]] = f.get_tensor(key)
            record = json.loads(meta["record"])
        except Exception as err:  # a file renamed into place is complete: this is corruption
            raise ValueError(f"stored layer {path} is unreadable ({type(err).__name__}: {err}); "
                             f"delete it (and the later layer_*.safetensors) to quantize from "
                             "that layer again") from err
        packed = None
        if "packed" in meta:
            entries = json.loads(meta["packed"])
            packed = {name: ({k[len(name) + 1:]: v for k, v in packed_tensors.items()
                              if k.startswith(name + ".")}, entry)
                      for name, entry in entries.items()}
        return weights, record, packed

    def has_packed(self, index: int) -> bool:
        from safetensors import safe_open

        with safe_open(str(self.path(index)), framework="pt") as f:
            return "packed" in (f.metadata() or {})

"""Packed 1-bit checkpoints of Haar-binarized linears and the modules that compute from them
(docs/packed.md)."""
from .codes import LinearCodes, dequantize, from_quantizer
from .io import compress, load_packed, pack, read_manifest
from .module import PackedLinear

__all__ = ["LinearCodes", "PackedLinear", "compress", "dequantize", "from_quantizer", "load_packed",
           "pack", "read_manifest"]

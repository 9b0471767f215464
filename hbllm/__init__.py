"""hbllm: 1-bit post-training quantization of LLMs (HBLLM, BiLLM, baselines).

>>> import hbllm
>>> cfg = hbllm.QuantConfig(method="hbllm", layout="row")
>>> res = hbllm.quantize_weight(weight, hessian, cfg)   # weight (rows, cols), hessian (cols, cols)
>>> model = hbllm.load_packed("outputs/<run>/packed")  # a save_packed=true run's checkpoint
"""
from .config import QuantConfig, RunConfig
from .packed import load_packed, pack
from .quant import QuantResult, quantize_weight

__all__ = ["QuantConfig", "RunConfig", "QuantResult", "quantize_weight", "pack", "load_packed"]
__version__ = "0.1.0"

"""Quantizers behind one entry point, ``quantize_weight``; every method is declared in the
registry (``registry.py``, entries in ``methods.py``): HBLLM, BiLLM, sign, RTN, GPTQ, PB-LLM."""
from .block_loop import QuantResult, quantize_block, quantize_weight, upper_inverse_cholesky
from .registry import Method, get_method, method_names, register

__all__ = ["QuantResult", "quantize_block", "quantize_weight", "upper_inverse_cholesky",
           "Method", "get_method", "method_names", "register"]

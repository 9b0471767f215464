"""Quantizers: HBLLM (Haar + split binarization), BiLLM, sign, none, under a GPTQ block loop."""
from .gptq import QuantResult, quantize_block, quantize_weight, upper_inverse_cholesky

__all__ = ["QuantResult", "quantize_block", "quantize_weight", "upper_inverse_cholesky"]

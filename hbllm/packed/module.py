"""``PackedLinear``: a drop-in ``nn.Linear`` replacement that computes from packed codes.

On CUDA, fp16/bf16 inputs run one of five kernels, chosen per (layer shape, tokens) by
:func:`kernel_for`: the NVRTC-compiled lookup-table GEMV of :mod:`hbllm.packed.cuda_lut` (up to
4 tokens a launch), the tensor-core codebook GEMV of :mod:`hbllm.packed.cuda_codebook` (fp16, up
to 16 tokens a launch; its buffers are built at a layer's first call) or its one-row-tile-a-block
form :mod:`hbllm.packed.cuda_tile` (fp16, up to 8 tokens a launch, no split-K), the tensor-core GEMV of
:mod:`hbllm.packed.cuda_mma` (bf16, up to 16 tokens a launch) or
:mod:`hbllm.packed.triton_kernels` (row layout: one fused ``tl.dot`` launch; col
layout: two ``tl.dot`` band launches plus torch glue), which also serves few tokens where NVRTC
is missing. Elsewhere the plain torch band path of :mod:`hbllm.packed.runtime`. None keeps a
full-precision copy of the weight; all read the tiled buffers of :func:`build_runtime`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.haar import INVERSE
from . import cuda_codebook, cuda_lut, cuda_mma, cuda_tile
from .runtime import build_runtime, pair_output, salient_input, torch_forward

try:  # Triton exists only where CUDA does; the CPU path never needs it.
    from . import triton_kernels
except ImportError:  # pragma: no cover - depends on the machine
    triton_kernels = None

GEMV_MAX_TOKENS = 1  # fallback rule: up to this many tokens the lookup-table GEMV (cuda_lut),
MMA_MAX_TOKENS = 16  # up to this many a tensor-core GEMV (fp16: cuda_codebook, bf16: cuda_mma);
# then Triton
KERNELS = ("lut", "mma", "cb", "tile", "triton")
# Measured choice per layer shape: (rows, cols) -> ((most tokens, kernel), ...) in increasing
# token order, as ``scripts/bench_kernel.py`` prints it; token counts past the last entry, and
# shapes not listed, follow the fallback rule above.
# Measured on an H200 (2026-11-29:
# experiments/benchmarks/raw/kernel_tile_pairsel_staging_2026-11-29.json).
KERNEL_TABLE: dict[tuple, tuple] = {
    (4096, 4096): ((8, "tile"), (16, "cb")),
    (11008, 4096): ((1, "tile"), (16, "cb")),
    (4096, 11008): ((4, "tile"), (16, "cb")),
}


def kernel_for(rows: int, cols: int, tokens: int, dtype: torch.dtype = torch.float16) -> str:
    """The kernel (one of :data:`KERNELS`) for ``tokens`` tokens of a (rows, cols) layer. The
    table is measured with fp16 inputs: for other dtypes a codebook kernel it names ("cb",
    "tile": fp16 only, a bf16 codebook would round the values) gives way to the fallback rule's
    bf16 choice (lookup tables, then the +-1 tensor-core GEMV)."""
    kernel = next((k for most, k in KERNEL_TABLE.get((rows, cols), ()) if tokens <= most), None)
    if kernel is None:
        kernel = ("lut" if tokens <= GEMV_MAX_TOKENS else "cb" if tokens <= MMA_MAX_TOKENS
                  else "triton")
    if kernel in ("cb", "tile") and dtype != torch.float16:
        kernel = "lut" if tokens <= GEMV_MAX_TOKENS else "mma"
    return kernel


class PackedLinear(nn.Module):
    """y = x W^T + b with W given by packed codes.

    ``packed``: the on-disk tensors (format.py), kept on the CPU for re-saving; ``meta``: the
    manifest entry; compute buffers are built on ``device`` (default: the CPU) and move with
    the module.
    """

    def __init__(self, packed: dict[str, torch.Tensor], meta: dict,
                 bias: torch.Tensor | None = None, device: torch.device | None = None):
        super().__init__()
        self.meta = dict(meta)
        self.in_features, self.out_features = meta["cols"], meta["rows"]
        self.packed = {k: v.cpu() for k, v in packed.items()}
        on_device = {k: v.to(device) for k, v in packed.items()} if device is not None else self.packed
        for name, buf in build_runtime(on_device, meta).items():
            self.register_buffer(name, buf, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(device),
                                                           requires_grad=False)
        self.use_triton = True  # set False to force the torch path on CUDA (tests, benchmarks)
        self.gemv = "auto"  # CUDA kernel: "auto" (kernel_for) or one of KERNELS (tests, benchmarks)
        most = int(self.sal_first.diff().max()) if self.sal_first.numel() > 1 else 0
        self._scratch: dict = {"block_sal_words": most}  # the lookup-table GEMV's sizes, workspace

    def extra_repr(self) -> str:
        m = self.meta
        return (f"in_features={m['cols']}, out_features={m['rows']}, layout={m['layout']}, "
                f"blocksize={m['blocksize']}, bias={self.bias is not None}")

    def runtime(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.named_buffers(recurse=False)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"PackedLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda and triton_kernels is not None and self.use_triton:
            y = self._triton_forward(x2.contiguous())
        else:
            y = torch_forward(x2, self.runtime(), self.meta).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        m, rt = self.meta, self.runtime()
        c = INVERSE[m["inverse"]]
        n, sal_words = x.shape[0], rt["sal_wgrp"].numel()
        half = x.dtype in (torch.float16, torch.bfloat16)
        kernel = kernel_for(m["rows"], m["cols"], n, x.dtype) if self.gemv == "auto" else self.gemv
        if kernel == "tile":  # fp16 only, inputs in shared memory: else the codebook GEMV
            if (x.dtype == torch.float16 and cuda_tile.available()
                    and cuda_tile.fits(m["cols"], sal_words, x.device)):
                return cuda_tile.gemv(x, rt, m, c, self._scratch)  # 8 tokens a launch
            kernel = "cb"
        if kernel == "cb":  # fp16 only (a bf16 codebook would round the values): else cuda_mma
            if x.dtype == torch.float16 and cuda_codebook.available():
                return cuda_codebook.gemv(x, rt, m, c, self._scratch)  # 16 tokens a launch
            kernel = "mma"
        if kernel == "lut" and half and n <= MMA_MAX_TOKENS and cuda_lut.available():
            return cuda_lut.gemv(x, rt, m, c, self._scratch)  # 4 tokens a launch
        if (kernel in ("lut", "mma") and half and n <= MMA_MAX_TOKENS and cuda_mma.available()
                and cuda_mma.fits(m["cols"], sal_words, x.device)):
            return cuda_mma.gemv(x, rt, m, c)
        if m["layout"] == "row":
            few = n <= GEMV_MAX_TOKENS
            return (triton_kernels.row_gemv if few else triton_kernels.row_mm)(x, rt, m, c)
        dt = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float16
        u = triton_kernels.band_mm((x * rt["ns_mask"]).to(dt), rt["main_sign"], rt["main_member"],
                                   rt["main_wgrp"], rt["main_stats"], m["rows"])
        zs = salient_input(x, rt["sal_cols"]).to(dt)
        u = u + triton_kernels.band_mm(zs, rt["sal_sign"], rt["sal_member"], rt["sal_wgrp"],
                                       rt["sal_stats"], m["rows"])
        return pair_output(u, c).to(x.dtype)

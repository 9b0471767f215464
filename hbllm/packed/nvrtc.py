"""What the NVRTC-compiled packed kernels (cuda_lut, cuda_mma) share: the CUDA prelude, the
compile step and the launch over token chunks with the (tiled) compute buffers of
:func:`hbllm.packed.runtime.build_runtime`.

A kernel source defines ``NAME`` and is compiled with ``DT`` (0 fp16, 1 bf16) plus its own macros;
its signature is ``NAME(PACKED_ARGS)``, the arguments :func:`launch` passes (see there), followed
by the ``extra`` ones it takes.

Programmatic dependent launch (sm_90+, :data:`PDL`): a kernel that calls ``dep_launch()`` early
and ``dep_wait()`` before its first read of ``x`` and its first global write may be launched with
``pdl=True``. It then starts while the kernel before it in the stream is still running: its
launch and its first weight loads overlap that kernel's tail, and ``dep_wait()`` holds it until
that kernel has finished and its writes are visible. Without the launch attribute both calls are
no-ops.
"""
from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

# u16 storage of fp16/bf16 values and their float conversions (no CUDA headers needed), the
# fp16 statistics of a row group, and the kernel parameters in the order :func:`launch` passes them.
PRELUDE = r"""
typedef unsigned short u16;
__device__ __forceinline__ float ld(u16 h) {
#if DT == 0
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#else
  return __uint_as_float(((unsigned)h) << 16);
#endif
}
__device__ __forceinline__ u16 st(float f) {
  u16 h;
#if DT == 0
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}
__device__ __forceinline__ float h2f(unsigned h) {  // fp16 whatever DT (the statistics)
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h)); return f;
}
// a row group's statistics [m0, a0, m1, a1] (fp16, 8 bytes) as floats
__device__ __forceinline__ float4 stats4(uint2 t) {
  return make_float4(h2f(t.x & 0xffff), h2f(t.x >> 16), h2f(t.y & 0xffff), h2f(t.y >> 16));
}
// element index of (tile t, word or group w, lane) in a tiled band buffer (runtime.py) of n
// words or groups per row, v per lane vector
__device__ __forceinline__ size_t tidx(int t, int w, int lane, int n, int v) {
  return (((size_t)t * (n / v) + w / v) * 32 + lane) * v + w % v;
}
// programmatic dependent launch (module docstring): let the next kernel launch / wait for the last
__device__ __forceinline__ void dep_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void dep_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
#define PACKED_ARGS const u16* __restrict__ x, u16* __restrict__ y, \
    const unsigned* __restrict__ ms, const unsigned* __restrict__ mm, const uint2* __restrict__ mst, \
    const unsigned* __restrict__ ss, const unsigned* __restrict__ sm, const int* __restrict__ sgrp, \
    const uint2* __restrict__ sst, const int* __restrict__ sc, const unsigned char* __restrict__ keep, \
    int N, int R, int C, int SW, int G, int NB, int WPG, double cd
"""


def supported() -> bool:
    """CUDA is there and this PyTorch compiles kernels with NVRTC (>= 2.9)."""
    return torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")


def compiles(build, min_major: int = 0) -> bool:
    """Whether CUDA, NVRTC (:func:`supported`) and compute capability ``min_major`` or newer are
    there and ``build()`` compiles a kernel (no NVRTC, an old driver, ...: False, so the caller's
    other kernels stay in use)."""
    if not supported() or torch.cuda.get_device_capability()[0] < min_major:
        return False
    try:
        build()
        return True
    except Exception:
        return False


def compile_offline(source: str, lib: str, arch: str) -> tuple[bytes, str]:
    """``source`` compiled without a GPU by the libnvrtc at path ``lib`` (for instance PyPI's
    ``nvidia-cuda-nvrtc``) for ``arch`` (``compute_XY``: PTX, ``sm_XY``: a cubin): (output, the
    compiler's log). Raises RuntimeError with the log when it does not compile. The
    ``libnvrtc-builtins`` beside ``lib`` are loaded first (no LD_LIBRARY_PATH needed)."""
    for builtins in sorted(Path(lib).parent.glob("libnvrtc-builtins.so*")):  # found beside it
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    nv = ctypes.CDLL(lib)
    prog = ctypes.c_void_p()
    if nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", 0, None, None):
        raise RuntimeError(f"nvrtcCreateProgram failed ({lib})")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"-default-device", b"-std=c++17"]
        rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace")
        if rc:
            raise RuntimeError(text)
        kind = "PTX" if arch.startswith("compute_") else "CUBIN"
        getattr(nv, f"nvrtcGet{kind}Size")(prog, ctypes.byref(size))
        out = ctypes.create_string_buffer(size.value)
        getattr(nv, f"nvrtcGet{kind}")(prog, out)
        return out.raw, text
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


def offline_library() -> str | None:
    """The libnvrtc for :func:`compile_offline`: $HBLLM_NVRTC_LIB, else that of a pip-installed
    ``nvidia-cuda-nvrtc`` (CUDA 13), else None."""
    if os.environ.get("HBLLM_NVRTC_LIB"):
        return os.environ["HBLLM_NVRTC_LIB"]
    try:
        import nvidia
    except ImportError:
        return None
    found = [p for root in nvidia.__path__ for p in Path(root).glob("cu13/lib/libnvrtc.so.*")]
    return str(found[0]) if found else None


def device_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


@functools.cache
def smem_limit(device: int) -> int:
    """Shared memory a block may opt in to on CUDA device ``device``, bytes."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def full_source(source: str, name: str, **macros: int) -> str:
    """The CUDA text compiled for kernel ``name``: ``#define``s for ``macros``, ``PRELUDE``,
    ``source``."""
    defines = "".join(f"#define {k} {v}\n" for k, v in {"NAME": name, **macros}.items())
    return defines + PRELUDE + source


def compile_kernel(source: str, name: str, device: int, **macros: int):
    """:func:`full_source` compiled as kernel ``name``, allowed the device's whole opt-in shared
    memory."""
    with torch.cuda.device(device):
        kernel = torch.cuda._compile_kernel(full_source(source, name, **macros), name)
        kernel.set_shared_memory_config(smem_limit(device))
    return kernel


# Launch kernels that support it (pdl=True) with programmatic dependent launch on sm_90+; set
# False (or HBLLM_PDL=0) for plain stream order, e.g. to measure what it buys.
PDL = os.environ.get("HBLLM_PDL", "1") != "0"
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _Attr(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)),
                ("num_attrs", ctypes.c_uint)]


@functools.cache
def pdl_supported(device: int) -> bool:
    """Programmatic dependent launch: compute capability 9.0+ and a driver with cuLaunchKernelEx."""
    lib = torch.cuda._utils._get_gpu_runtime_library()
    return torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(lib, "cuLaunchKernelEx")


@functools.cache
def resident_blocks(kernel, threads: int, smem: int, device: int) -> int:
    """Blocks of ``threads`` threads and ``smem`` bytes of shared memory that ``kernel`` runs at
    once on CUDA device ``device`` (blocks an SM holds x SMs; at least one)."""
    lib = torch.cuda._utils._get_gpu_runtime_library()
    per_sm = ctypes.c_int()
    with torch.cuda.device(device):
        rc = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(per_sm), kernel.func, ctypes.c_int(threads), ctypes.c_size_t(smem))
    if rc:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed with CUresult {rc}")
    return max(per_sm.value, 1) * torch.cuda.get_device_properties(device).multi_processor_count


def settled(scratch: dict, key) -> bool:
    """Whether ``key`` (a kernel on a device) has launched before for the layer that keeps
    ``scratch``; records that it has now. A layer's first launch follows the writes of its
    buffers by other kernels, so only later ones may start early (``pdl=True``)."""
    before = ("settled", key) in scratch
    scratch[("settled", key)] = True
    return before


def launch_dependent(kernel, grid: tuple, block: tuple, args: Sequence, smem: int) -> None:
    """``kernel(grid=..., block=..., args=..., shared_mem=...)`` on the current stream, with the
    programmatic-stream-serialization attribute (the kernel must call ``dep_wait()``)."""
    keep, params = [], []
    for a in args:  # as torch's launcher passes them: pointers, C ints, C doubles
        v = (ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
             else ctypes.c_int(a) if isinstance(a, int) else ctypes.c_double(a))
        keep.append(v)
        params.append(ctypes.cast(ctypes.byref(v), ctypes.c_void_p))
    attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    cfg = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem,
                  ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), ctypes.pointer(attr), 1)
    lib = torch.cuda._utils._get_gpu_runtime_library()
    rc = lib.cuLaunchKernelEx(ctypes.byref(cfg), kernel.func,
                              (ctypes.c_void_p * len(params))(*params), None)
    if rc:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc}")


def launch(kernel, x: torch.Tensor, rt: dict[str, torch.Tensor], meta: dict, c: float, nt: int,
           grid: tuple, threads: int, smem: int, extra: Sequence = (),
           pdl: bool = False) -> torch.Tensor:
    """y (N, R) = x (N, C) W^T by ``kernel``, ``nt`` tokens a launch. Kernel arguments: x, y, the
    main and salient band buffers, the col layout's non-salient mask, tokens, R, C, salient words,
    main statistics groups, blocks, words per main group, the inverse-Haar constant, then
    ``extra``. ``pdl``: the kernel supports programmatic dependent launch (module docstring);
    used when :data:`PDL` is set and the device has it."""
    if x.data_ptr() % 16:  # the kernels read x 16 bytes (8 columns) or a column pair at a time
        x = x.clone()
    n, cols = x.shape
    rows, row, bs = meta["rows"], meta["layout"] == "row", meta["blocksize"]
    y = torch.empty(n, rows, device=x.device, dtype=x.dtype)
    keep = rt["sal_cols"] if row else rt["ns_mask"]  # bool: one byte per column; unused for row
    groups = rt["main_stats"].shape[1] * rt["main_stats"].shape[3]  # (T, G/SV, 32, SV, 4)
    dependent = pdl and PDL and pdl_supported(device_index(x.device))
    for i in range(0, n, nt):
        xi, yi = x[i:i + nt], y[i:i + nt]
        args = [xi, yi, rt["main_sign"], rt["main_member"], rt["main_stats"],
                rt["sal_sign"], rt["sal_member"], rt["sal_wgrp"], rt["sal_stats"], rt["sal_cols"],
                keep, xi.shape[0], rows, cols, rt["sal_wgrp"].numel(), groups,
                cols // bs, bs // (64 if row else 32), float(c), *extra]
        if dependent:
            launch_dependent(kernel, grid, (threads, 1, 1), args, smem)
        else:
            kernel(grid=grid, block=(threads, 1, 1), shared_mem=smem, args=args)
    return y

"""CUDA paths of PackedLinear (NVRTC lookup-table and tensor-core GEMVs, Triton), all on the tiled
layout, vs the dequantized-weight matmul (CUDA only)."""
import pytest
import torch

from hbllm.packed import cuda_codebook, cuda_lut, cuda_mma, cuda_tile, module
from hbllm.packed.codes import dequantize
from hbllm.packed.format import linear_meta, pack_linear
from hbllm.packed.module import GEMV_MAX_TOKENS, MMA_MAX_TOKENS, PackedLinear, triton_kernels
from packed_synthetic import random_codes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or triton_kernels is None,
                                reason="needs CUDA and triton")
def _poison(y_bytes: int) -> None:
    """Leave NaN in the caching allocator's free blocks that the next outputs will reuse, so an
    element a kernel does not write shows up as non-finite."""
    for size in (y_bytes, 2 * y_bytes):
        del_me = torch.full((size // 2 + 1,), float("nan"), device="cuda", dtype=torch.float16)
        del del_me


CASES = [("row", False, "exact"), ("row", True, "exact"), ("col", False, "exact"),
         ("col", True, "authors"), ("row", False, "authors")]


@pytest.mark.parametrize("layout,shared,inverse", CASES)
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize,cols", [(128, 512), (64, 320), (128, 384)])
def test_triton_matches_dequantized(layout, shared, inverse, batch, dtype, blocksize, cols):
    """Tiled-layout variants: 16-byte word vectors (blocksize 128) or 8-byte ones (64); an even
    (512) or odd (320, 384) number of blocks, i.e. statistics loaded in pairs or singly; 200 rows,
    a partial last row tile."""
    torch.manual_seed(batch)
    codes = random_codes(layout, 200, cols, blocksize=blocksize, shared=shared, inverse=inverse,
                         seed=batch, zero_k_block=(batch == 5))
    bias = torch.randn(200)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes), bias).cuda()
    x = torch.randn(batch, cols, device="cuda").to(dtype)
    ref = x.double() @ dequantize(codes).double().cuda().T + bias.double().cuda()
    tol = 4e-3 if dtype == torch.float16 else 1.6e-2
    for gemv in ("auto",) + module.KERNELS:  # each kernel at every token count it takes
        mod.gemv = gemv
        _poison(y_bytes=x.shape[0] * 200 * 4)
        y = mod(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert ((y.double() - ref).norm() / ref.norm()).item() < tol, gemv
    mod.use_triton = False
    y_torch = mod(x)
    assert ((y_torch.double() - ref).norm() / ref.norm()).item() < tol


def test_auto_picks_each_kernel_by_tokens(monkeypatch):
    """The fallback rule for a shape without measurements: the lookup-table GEMV up to
    GEMV_MAX_TOKENS, then the codebook GEMV (fp16) or the +-1 tensor-core GEMV (bf16) up to
    MMA_MAX_TOKENS, then Triton."""
    assert cuda_lut.available() and cuda_mma.available() and cuda_codebook.available()
    codes = random_codes("row", 64, 256, seed=3)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    calls = []
    for name, kernel in (("lut", cuda_lut), ("mma", cuda_mma), ("cb", cuda_codebook)):
        monkeypatch.setattr(kernel, "gemv", lambda x, *a, name=name: calls.append(name)
                            or torch.zeros(x.shape[0], 64, device="cuda", dtype=x.dtype))
    for dtype, tensor_core in ((torch.float16, "cb"), (torch.bfloat16, "mma")):
        for n, want in ((1, "lut"), (GEMV_MAX_TOKENS, "lut"), (GEMV_MAX_TOKENS + 1, tensor_core),
                        (MMA_MAX_TOKENS, tensor_core), (MMA_MAX_TOKENS + 1, None)):
            calls.clear()
            mod(torch.randn(n, 256, device="cuda", dtype=dtype))
            assert calls == ([want] if want else []), (dtype, n)


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("batch", [1, 2, 7, 8, 13, 16])
def test_mma_gemv_odd_pairs_and_tokens(layout, batch):
    """70 rows: 35 pairs, the last 16-pair tile is partial; 7 tokens: a partial n-tile; 13 and 16:
    two n-tiles in one launch (13: the second partial)."""
    codes = random_codes(layout, 70, 384, seed=batch)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    mod.gemv = "mma"
    x = torch.randn(batch, 384, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize(codes).double().cuda().T
    assert ((mod(x).double() - ref).norm() / ref.norm()).item() < 4e-3


def test_large_shapes_chunk_tokens():
    """C = 11008 (LLaMA down_proj): 16 tokens do not fit one block's shared memory at once (the
    tensor-core GEMV takes 8 a launch)."""
    codes = random_codes("row", 128, 11008, seed=5)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    x = torch.randn(16, codes.cols, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize(codes).double().cuda().T
    for gemv, n in (("mma", 8), ("mma", 16), ("lut", 4), ("lut", 8)):
        mod.gemv = gemv
        assert ((mod(x[:n]).double() - ref[:n]).norm() / ref[:n].norm()).item() < 4e-3, gemv


def test_triton_3d_input_and_odd_rows_tile():
    codes = random_codes("row", 66, 256, seed=7)  # 66 rows: last GEMV tile is partial
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize(codes).double().cuda().T
    for gemv in module.KERNELS:
        mod.gemv = gemv
        for n in (1, 3):
            y = mod(x[:, :n])
            r = ref[:, :n]
            assert ((y.double() - r).norm() / r.norm()).item() < 4e-3, gemv


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("blocksize,cols", [(128, 384), (64, 320), (128, 11008)])
@pytest.mark.parametrize("cb", [1, 2, 4])
def test_lut_gemv_chunks_and_workspace(monkeypatch, layout, blocksize, cols, cb):
    """Column chunks of ``cb`` blocks (a partial last chunk when cb does not divide the blocks),
    blocksize 64 (scalar word loads), 70 rows (a partial tile), 1-4 tokens, blocks with up to
    blocksize/32 salient words (the tables' capacity); calling again gives
    the same output (the last block of a tile resets the shared workspace and counter)."""
    monkeypatch.setitem(cuda_lut.CONFIG, "cb", cb)
    codes = random_codes(layout, 70, cols, blocksize=blocksize, seed=cols + cb,
                         max_k=blocksize - 1)  # up to blocksize/32 salient words in a block
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    mod.gemv = "lut"
    x = torch.randn(4, cols, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize(codes).double().cuda().T
    for n in (1, 2, 3, 4):
        y = mod(x[:n])
        assert ((y.double() - ref[:n]).norm() / ref[:n].norm()).item() < 4e-3, n
        again = mod(x[:n]).double()  # atomics add in any order: equal up to rounding
        assert ((again - y.double()).norm() / y.double().norm()).item() < 1e-3, n


def _assert_replays(graph, x, y, codes):
    """Three replays of ``graph`` (captured as ``y = layer(x)``) on fresh inputs compute the
    layer."""
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        ref = x.double() @ dequantize(codes).double().cuda().T
        graph.replay()
        torch.cuda.synchronize()
        assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3


def test_lut_gemv_first_call_inside_graph_capture():
    """The workspace is made at a layer's first call without a host sync, so that call may be
    captured in a CUDA graph; replays compute the layer."""
    codes = random_codes("row", 256, 1024, seed=11)
    packed, meta = pack_linear(codes), linear_meta(codes)
    warm = PackedLinear(packed, meta).cuda()  # compiles the kernel outside the capture
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    warm(x)
    mod = PackedLinear(packed, meta).cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mod(x)
    _assert_replays(graph, x, y, codes)


def test_tuned_tables_pick_kernel_and_config(monkeypatch):
    """KERNEL_TABLE decides per (shape, tokens), the fallback rule past it and for other shapes;
    per-shape launch configs (TUNED) are used and stay correct."""
    codes = random_codes("row", 64, 256, seed=3)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    x = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize(codes).double().cuda().T
    monkeypatch.setitem(cuda_lut.TUNED, (64, 256, 2), {"warps": 1, "cb": 1})
    monkeypatch.setitem(cuda_mma.TUNED, (64, 256, 8), {"ksplit": 4})
    monkeypatch.setitem(cuda_codebook.TUNED, (64, 256, 8), {"warps": 2, "cb": 1, "st": 2})
    assert cuda_lut.config(64, 256, 2) == {"warps": 1, "cb": 1}
    assert cuda_lut.config(64, 512, 2) == cuda_lut.CONFIG
    assert cuda_codebook.config(64, 256, 5) == {"warps": 2, "cb": 1, "st": 2}  # bucket of 5: 8
    assert cuda_codebook.config(64, 256, 4) == cuda_codebook.CONFIG
    assert cuda_codebook.config(64, 512, 8) == cuda_codebook.CONFIG
    for n, gemv in ((2, "lut"), (8, "mma"), (8, "cb")):
        mod.gemv = gemv
        assert ((mod(x[:n]).double() - ref[:n]).norm() / ref[:n].norm()).item() < 4e-3, gemv
    monkeypatch.setitem(module.KERNEL_TABLE, (64, 256), ((2, "mma"), (8, "triton")))
    assert [module.kernel_for(64, 256, n) for n in (1, 2, 3, 8, 9, 17)] == \
        ["mma", "mma", "triton", "triton", "cb", "triton"]
    assert module.kernel_for(64, 512, 1) == "lut"
    calls = []
    for name, mod_ in (("lut", cuda_lut), ("mma", cuda_mma), ("cb", cuda_codebook)):
        monkeypatch.setattr(mod_, "gemv", lambda x, *a, name=name: calls.append(name)
                            or torch.zeros(x.shape[0], 64, device="cuda", dtype=x.dtype))
    mod.gemv = "auto"
    for n, want in ((1, ["mma"]), (4, []), (9, ["cb"])):
        calls.clear()
        mod(x[:n])
        assert calls == want, n


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("blocksize,cols", [(128, 384), (64, 320), (128, 11008)])
@pytest.mark.parametrize("cb,st", [(1, 4), (2, 2), (4, 3), (4, 6)])
def test_codebook_gemv_chunks_and_workspace(monkeypatch, layout, blocksize, cols, cb, st):
    """The tensor-core codebook GEMV: column chunks of ``cb`` blocks (a partial last chunk when
    cb does not divide the blocks), rings of ``st`` stages (more than a chunk's blocks, fewer,
    not a power of two), blocksize 64, 70 rows (a partial tile), 1-17 tokens (one and two
    n-tiles, two launches), blocks with up to blocksize/32 salient words (past the two a stage
    holds); calling again gives the same output (the workspace and counters are reset by the
    last block of a tile)."""
    monkeypatch.setitem(cuda_codebook.CONFIG, "cb", cb)
    monkeypatch.setitem(cuda_codebook.CONFIG, "st", st)
    codes = random_codes(layout, 70, cols, blocksize=blocksize, seed=cols + cb, max_k=blocksize - 1)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    mod.gemv = "cb"
    x = torch.randn(17, cols, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize(codes).double().cuda().T
    for n in (1, 3, 8, 9, 16, 17):
        y = mod(x[:n])
        assert ((y.double() - ref[:n]).norm() / ref[:n].norm()).item() < 4e-3, n
        again = mod(x[:n]).double()
        assert ((again - y.double()).norm() / y.double().norm()).item() < 1e-3, n


def test_codebook_gemv_in_a_graph_after_a_first_call():
    """The codebook buffers are built at the first call (it synchronizes): inside a capture that
    is a clear error; after one eager call, replays of a captured graph compute the layer."""
    codes = random_codes("row", 256, 1024, seed=11)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    mod.gemv = "cb"
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="call the layer once before capturing"):
        with torch.cuda.graph(graph):
            mod(x)
    mod(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mod(x)
    _assert_replays(graph, x, y, codes)


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("blocksize,cols", [(128, 384), (64, 320), (128, 11008)])
@pytest.mark.parametrize("warps,grid", [(1, None), (3, 2), (8, None), (16, 2), (16, None)])
def test_tile_gemv_warps_and_tokens(monkeypatch, layout, blocksize, cols, warps, grid):
    """The row-tile codebook GEMV: warps splitting a tile's blocks into ranges (uneven with 3;
    more warps than blocks at 320 and 384 columns, so some warps have none; each warp stages
    the inputs of its own blocks), blocksize 64, 70 rows (a partial tile),
    blocks that walk several tiles (a grid of 2 for 3 tiles), 1-17 tokens (8 a launch, fewer at
    11008 columns where the staged inputs of 8 tokens do not fit shared memory), blocks with up
    to blocksize/32 salient words (past the two a warp preloads). No atomics: calling again
    gives the same bits."""
    from hbllm.packed import nvrtc

    monkeypatch.setattr(cuda_tile, "CONFIG", dict(warps=warps, pdl=3))
    if grid:
        monkeypatch.setattr(nvrtc, "resident_blocks", lambda *a: grid)
    calls = []
    run = cuda_tile.gemv
    monkeypatch.setattr(cuda_tile, "gemv", lambda *a: (calls.append(1), run(*a))[1])
    codes = random_codes(layout, 70, cols, blocksize=blocksize, seed=cols + warps,
                         max_k=blocksize - 1)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes)).cuda()
    mod.gemv = "tile"
    x = torch.randn(17, cols, device="cuda", dtype=torch.float16)
    ref = x.double() @ dequantize(codes).double().cuda().T
    for n in (1, 2, 3, 8, 9, 17):
        _poison(y_bytes=n * 70 * 2)
        y = mod(x[:n])
        assert torch.isfinite(y).all(), n
        assert ((y.double() - ref[:n]).norm() / ref[:n].norm()).item() < 4e-3, n
        assert torch.equal(mod(x[:n]), y), n
    assert len(calls) == 12  # the tile kernel ran, not the codebook GEMV it falls back to
    if cols == 11008:
        assert cuda_tile.tokens_a_launch(cols, mod.sal_wgrp.numel(), warps, 0) < 8


@pytest.mark.parametrize("kernel", ["lut", "cb", "tile"])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("pdl", [1, 2, 3])
def test_dependent_launches_read_the_previous_output(monkeypatch, kernel, graph, pdl):
    """Programmatic dependent launch (sm_90+): a call starts while the one before it runs, and its
    input is that call's output. In a chain of calls, eager or replayed from a CUDA graph, every
    output matches the reference for the input it was given (a read of x, or a write, before
    ``dep_wait`` would not); after a layer's first call, every launch is a dependent one."""
    from hbllm.packed import nvrtc

    for config in (cuda_lut.CONFIG, cuda_codebook.CONFIG):
        monkeypatch.setitem(config, "cb", 2)  # several column chunks: the workspace path
    for config in (cuda_lut.CONFIG, cuda_codebook.CONFIG, cuda_tile.CONFIG):
        monkeypatch.setitem(config, "pdl", pdl)  # the next launch from the start / end / block 1
    codes = [random_codes("row", 512, 512, seed=s) for s in (1, 2)]
    mods = [PackedLinear(pack_linear(c), linear_meta(c)).cuda() for c in codes]
    weights = [dequantize(c).double().cuda() for c in codes]
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)  # one launch a call
    for m in mods:
        m.gemv = kernel
        m(x)  # the first call of a layer is a plain launch
    dependent = []
    plain = nvrtc.launch_dependent
    monkeypatch.setattr(nvrtc, "launch_dependent", lambda *a: (dependent.append(1), plain(*a)))

    def chain() -> list:
        ys = [x]
        for i in range(6):
            ys.append(mods[i % 2](ys[-1]))
        return ys

    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ys = chain()
        g.replay()
    else:
        ys = chain()
    torch.cuda.synchronize()
    for i in range(6):
        ref = ys[i].double() @ weights[i % 2].T
        y = ys[i + 1].double()
        assert torch.isfinite(y).all() and ((y - ref).norm() / ref.norm()).item() < 4e-3, i
    if nvrtc.PDL and nvrtc.pdl_supported(torch.cuda.current_device()):
        assert len(dependent) == 6

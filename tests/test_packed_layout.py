"""The tiled (coalesced) device layout of runtime.py, on the CPU: tiling is a bijection with the
documented lane -> row map, and a float64 emulation of what each CUDA kernel computes from the
flat tiled buffers (its index arithmetic, its algebra, its lane -> output-row combination) equals
dequantize-then-matmul. The kernels themselves run in tests/test_packed_triton.py (CUDA)."""

import pytest
import torch

from hbllm.packed import codebook, cuda_codebook, cuda_lut, cuda_mma, cuda_tile, module, nvrtc
from hbllm.packed.codes import dequantize
from hbllm.packed.format import linear_meta, pack_linear
from hbllm.packed.runtime import (
    band_rows,
    band_words,
    build_runtime,
    haar_input,
    salient_input,
    stats_vec,
    tile,
    tile_slots,
    unpack_words,
    untile,
    word_vec,
)
from hbllm.quant.haar import INVERSE
from packed_synthetic import random_codes

CASES = [("row", False, "exact", 128), ("row", True, "exact", 64), ("col", False, "exact", 128),
         ("col", True, "authors", 64), ("row", False, "authors", 128)]


@pytest.mark.parametrize("rows", [2, 32, 66, 70, 96])
@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("vec", [1, 2, 4])
def test_tile_untile_identity_and_lane_map(rows, pair, vec):
    a = torch.randint(-2**31, 2**31 - 1, (rows, 8), dtype=torch.int32)
    t = tile(a, pair, vec)
    tiles = (rows + 31) // 32
    assert t.shape == (tiles, 8 // vec, 32, vec) and t.is_contiguous()
    assert torch.equal(untile(t, rows, pair), a)
    half = rows // 2
    for ti in range(tiles):
        for lane in range(32):
            if pair:
                p = 16 * ti + lane % 16
                row = p + (half if lane >= 16 else 0) if p < half else None
            else:
                row = 32 * ti + lane if 32 * ti + lane < rows else None
            got = torch.stack([t[ti, w // vec, lane, w % vec] for w in range(8)])
            assert torch.equal(got, a[row] if row is not None else torch.zeros_like(a[0]))
    assert sorted(s for s in tile_slots(rows, pair).tolist() if s >= 0) == list(range(rows))


def test_tile_statistics_trailing_dims():
    st = torch.randn(70, 6, 4).half()
    t = tile(st, True, 2)
    assert t.shape == (3, 3, 32, 2, 4)
    assert torch.equal(untile(t, 70, True), st)


@pytest.mark.parametrize("layout,shared,inverse,bs", CASES)
def test_runtime_buffers_are_tiled(layout, shared, inverse, bs):
    codes = random_codes(layout, 70, 4 * bs, blocksize=bs, shared=shared, inverse=inverse, seed=2)
    meta = linear_meta(codes)
    rt = build_runtime(pack_linear(codes), meta)
    w = codes.cols // 32
    assert rt["main_sign"].shape == (3, w // word_vec(bs // 32), 32, word_vec(bs // 32))
    groups = w // (bs // (64 if layout == "row" else 32))
    assert rt["main_stats"].shape == (3, groups // stats_vec(groups), 32, stats_vec(groups), 4)
    assert rt["sal_sign"].shape[::2] == (3, 32) and rt["sal_sign"].shape[-1] == 1
    assert rt["sal_stats"].shape[-2] == stats_vec(4)


def _tidx(t, w, lane, n, v):
    """The kernels' ``tidx``: element index of (tile, word or group, lane) in a tiled buffer."""
    return ((t * (n // v) + w // v) * 32 + lane) * v + w % v


def _band_sums(words_s, words_g, stats, wgrp, z, algebra):
    """Per (tile, lane, token) band row sums ``sum_j w_j z_j`` of a tiled band, read through the
    flat buffers with the kernels' index arithmetic. z: (N, 32 W) float64."""
    tiles, _, _, v = words_s.shape
    n_w = wgrp.numel()
    sv = stats.shape[3]
    n_g = stats.shape[1] * sv
    t = torch.arange(tiles).view(-1, 1, 1)
    w = torch.arange(n_w).view(1, -1, 1)
    lane = torch.arange(32).view(1, 1, -1)
    idx = _tidx(t, w, lane, n_w, v)                                  # (T, W, 32)
    bit = torch.arange(32)
    s = ((words_s.reshape(-1)[idx].unsqueeze(-1) >> bit) & 1).double()  # (T, W, 32 lanes, 32 bits)
    g = ((words_g.reshape(-1)[idx].unsqueeze(-1) >> bit) & 1).double()
    grp = wgrp.long().view(1, -1, 1)
    sidx = _tidx(t, grp, lane, n_g, sv)                              # (T, W, 32) stats of the word
    m0, a0, m1, a1 = stats.reshape(-1, 4).double()[sidx].unbind(-1)  # (T, W, 32) each
    zw = z.view(z.shape[0], 1, n_w, 1, 32)                           # (N, 1, W, 1, 32 bits)
    if algebra == "lut":  # sum w z = (m0-a0) Z + (m1-m0+a0-a1) Z_g + 2 a0 Z_s + 2 (a1-a0) Z_sg
        zs, zg, zx = ((s * zw).sum(-1), (g * zw).sum(-1), (s * g * zw).sum(-1))
        zz = zw.sum(-1)
        per_word = ((m0 - a0) * zz + (m1 - m0 + a0 - a1) * zg + 2 * a0 * zs + 2 * (a1 - a0) * zx)
    else:  # mma: mid Z + amid Z_S + dm Z_G + da Z_SG with S, G, SG in {-1, +1}
        sp, gp = 2 * s - 1, 2 * g - 1
        parts = [zw.sum(-1), (sp * zw).sum(-1), (gp * zw).sum(-1), (sp * gp * zw).sum(-1)]
        coef = [(m0 + m1) / 2, (a0 + a1) / 2, (m1 - m0) / 2, (a1 - a0) / 2]
        per_word = sum(k * p for k, p in zip(coef, parts))
    return per_word.sum(2).permute(1, 2, 0)                           # (T, 32, N)


def kernel_reference(x, rt, meta, algebra):
    """y (N, R) as the CUDA kernels compute it: band sums per lane, then lanes -> output rows
    (row layout main: lane l of tile t is row 32t + l; pair bands: output rows 32t + 2i, 2i + 1
    get c(lo + hi), c(lo - hi) with lo = lane i, hi = lane 16 + i)."""
    c = INVERSE[meta["inverse"]]
    rows, bs, row = meta["rows"], meta["blocksize"], meta["layout"] == "row"
    x = x.double()
    z = haar_input(x, bs, c) if row else x * rt["ns_mask"]
    main = _band_sums(rt["main_sign"], rt["main_member"], rt["main_stats"], rt["main_wgrp"], z,
                      algebra)
    pair = _band_sums(rt["sal_sign"], rt["sal_member"], rt["sal_stats"], rt["sal_wgrp"],
                      salient_input(x, rt["sal_cols"]), algebra)
    if not row:
        pair = pair + main
    lo, hi = pair[:, :16], pair[:, 16:]                              # (T, 16, N)
    out = torch.stack([c * (lo + hi), c * (lo - hi)], 2).reshape(-1, 32, x.shape[0])
    if row:
        out = out + main
    return out.reshape(-1, x.shape[0])[:rows].T


@pytest.mark.parametrize("layout,shared,inverse,bs", CASES)
@pytest.mark.parametrize("algebra", ["lut", "mma"])
@pytest.mark.parametrize("rows", [70, 96])
def test_kernel_reference_matches_dequantized(layout, shared, inverse, bs, algebra, rows):
    codes = random_codes(layout, rows, 3 * bs, blocksize=bs, shared=shared, inverse=inverse,
                         seed=rows, max_k=bs - 1, zero_k_block=True)
    meta = linear_meta(codes)
    rt = build_runtime(pack_linear(codes), meta)
    x = torch.randn(3, codes.cols)
    ref = x.double() @ dequantize(codes).double().T
    y = kernel_reference(x, rt, meta, algebra)
    assert y.shape == ref.shape
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6


def test_band_rows_of_each_band():
    assert not band_rows("main", {"layout": "row"}) and band_rows("main", {"layout": "col"})
    assert band_rows("sal", {"layout": "row"}) and band_rows("sal", {"layout": "col"})


def _nvrtc_lib():
    return nvrtc.offline_library()


def _compile_ptx(source: str) -> str:
    """PTX for sm_90 of a CUDA source with the libnvrtc at $HBLLM_NVRTC_LIB (no GPU needed),
    compiled without warnings."""
    ptx, log = nvrtc.compile_offline(source, _nvrtc_lib(), "compute_90")
    assert "warning" not in log, log
    return ptx.rstrip(b"\0").decode()


@pytest.mark.skipif(not _nvrtc_lib(), reason="pip install nvidia-cuda-nvrtc (or set HBLLM_NVRTC_LIB) to compile")
def test_cuda_sources_compile_for_sm90():
    """Every kernel variant the runtime can ask for compiles without warnings (CPU: NVRTC only),
    the tiled loads are 16-byte vectors where the layout allows them, and the lookup-table and
    codebook GEMVs (and the row-tile one) take part in programmatic dependent launch (each
    trigger position)."""
    for row in (True, False):
        for bs, cb, msv, ssv in ((128, 2, 2, 2), (128, 1, 1, 1), (64, 4, 2, 1), (64, 1, 1, 2)):
            mv = word_vec(bs // 32)
            for i, (nt, bf16) in enumerate(((1, False), (4, True))):
                trig = 1 + (i + bs // 64) % 3  # each trigger position at some blocksize
                ptx = _compile_ptx(nvrtc.full_source(cuda_lut.SOURCE, "k", **cuda_lut.macros(
                    row, nt, bf16, bs, cb, mv, msv, ssv, trig)))
                assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
                # 16-byte loads: 4 words a lane, or a row-layout block's two statistics groups
                assert (".v4.u32" in ptx) == (mv == 4 or (row and msv == 2))
            for nt, bf16 in ((1, True), (8, False), (16, True)):
                ptx = _compile_ptx(nvrtc.full_source(cuda_mma.SOURCE, "k", **cuda_mma.macros(
                    row, nt, bf16, bs, mv, msv, ssv)))
                assert "mma.sync.aligned.m16n8k16" in ptx
            for i, (nt, st) in enumerate(((8, 2), (16, 5))):
                trig = 1 + (i + bs // 64) % 3
                ptx = _compile_ptx(nvrtc.full_source(cuda_codebook.SOURCE, "k", **cuda_codebook.macros(
                    row, nt, bs, cb, st, trig)))
                assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
                assert "mma.sync.aligned.m16n8k16" in ptx and "prmt.b32" in ptx
                assert "cp.async.cg.shared.global" in ptx and "cp.async.wait_group" in ptx
            for trig in (1, 2, 3):
                ptx = _compile_ptx(nvrtc.full_source(cuda_tile.SOURCE, "k", **cuda_tile.macros(
                    row, bs, trig)))
                assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
                assert "mma.sync.aligned.m16n8k16" in ptx and "prmt.b32" in ptx
                assert "atom." not in ptx and "red.global" not in ptx  # no split-K workspace
            ptx = _compile_ptx(nvrtc.full_source(cuda_tile.SOURCE, "k", PROBE=1,
                                                 **cuda_tile.macros(row, bs)))  # tile_timeline
            assert "%globaltimer" in ptx and "%clock64" in ptx


def _emulate_codebook(cb: dict, rt: dict, meta: dict, band: str) -> torch.Tensor:
    """What a lane's A fragments hold, for every lane, word and register, by the kernel's own
    steps (selector, byte permute of the row's codebook): float32 (T * 32, 32 W), slot order."""
    codes, bk = cb[f"cb_{band}"], cb[f"book_{band}"]
    tiles = codes.shape[0]
    if band == "main":  # (T, W/2, 32, [A, B, A, B]) -> (T, W, 32, [A, B])
        codes = codes.view(tiles, -1, 32, 2, 2).transpose(2, 3).reshape(tiles, -1, 32, 2)
    words = codes.shape[1]
    w = codes.long() & 0xFFFFFFFF
    gpb = bk.shape[-1] // 4
    byts = bk.contiguous().view(torch.uint8).view(tiles, bk.shape[1], 32, gpb, 8).long()
    if band == "main":
        wpb = meta["blocksize"] // 32
        blk, grp = torch.arange(words) // wpb, (torch.arange(words) % wpb) * gpb // wpb
    else:
        blk, grp = rt["sal_wgrp"].long(), torch.zeros(words, dtype=torch.long)
    wb = byts.permute(1, 3, 0, 2, 4)[blk, grp].permute(1, 0, 2, 3)  # (T, W, slot, 8 bytes)
    lane = torch.arange(32)
    g, q = lane // 4, lane % 4
    out = torch.zeros(tiles, 32, words, 32)
    for j, p in enumerate(codebook.FIELDS):
        tau, r, h = j // 4, (j // 2) % 2, j % 2
        col = 8 * q + 4 * tau + 2 * r  # lane q's B fragments: columns 8q .. 8q + 7 of the word
        for v in range(2):
            slot = g + 8 * h + 16 * v
            sel = codebook.selector(w[..., v], p)  # (T, W, 32)
            assert not (sel & 0x8888).any()  # no nibble the permute reads replicates a sign
            row_bytes = wb[:, :, slot, :]  # (T, W, 32 lanes, 8)
            b = [torch.gather(row_bytes, -1, ((sel >> (4 * i)) & 7)[..., None]).squeeze(-1)
                 for i in range(4)]
            for k, (lo, hi) in enumerate(((b[0], b[1]), (b[2], b[3]))):
                half = (lo | (hi << 8)).to(torch.int16).view(torch.float16).float()
                out[:, slot, :, col + k] = half.permute(2, 0, 1)
    return out.view(tiles * 32, words * 32)


def test_kernel_choice_by_dtype(monkeypatch):
    """KERNEL_TABLE is measured with fp16 inputs. Where it names a codebook kernel (fp16 only),
    bf16 inputs take the fallback rule's bf16 kernels: the lookup tables at 1 token, the +-1
    tensor-core GEMV up to 16; past the table the fallback rule, by dtype."""
    monkeypatch.setitem(module.KERNEL_TABLE, (64, 256), ((1, "tile"), (8, "cb"), (12, "mma")))
    tokens = (1, 4, 12, 16, 17)
    assert [module.kernel_for(64, 256, n) for n in tokens] == ["tile", "cb", "mma", "cb", "triton"]
    assert [module.kernel_for(64, 256, n, torch.bfloat16) for n in tokens] == \
        ["lut", "mma", "mma", "mma", "triton"]
    assert [module.kernel_for(64, 512, n, torch.bfloat16) for n in (1, 2)] == ["lut", "mma"]


def test_codebook_salient_words_end_in_spare_zeros():
    """The row-tile GEMV loads a block's first two salient words whether it has them or not: the
    salient code buffer's storage holds SPARE_SAL_WORDS zero words (32 lanes x 2) after the last
    tile's, for the last tile's blocks without salient words."""
    codes = random_codes("row", 70, 512, seed=4, max_k=40)
    meta = linear_meta(codes)
    sal = codebook.build(build_runtime(pack_linear(codes), meta), meta)["cb_sal"]
    whole = torch.empty(0, dtype=sal.dtype).set_(sal.untyped_storage())
    assert sal.data_ptr() == whole.data_ptr() and sal.is_contiguous()
    assert whole.numel() == sal.numel() + codebook.SPARE_SAL_WORDS * 64
    assert not whole[sal.numel():].any() and sal.any()


@pytest.mark.parametrize("layout,blocksize", [("row", 128), ("row", 64), ("col", 128), ("col", 64)])
def test_codebook_layout_decodes_to_the_band(layout, blocksize):
    """The tensor-core codebook buffers, decoded the way the kernel decodes them (a selector
    from the stored word, a byte permute of the row's codebook), give every band's weights
    (fp16 codebook values) at their slots, and zeros in padding slots; 70 rows (a partial tile),
    blocks with several salient words."""
    codes = random_codes(layout, 70, 4 * blocksize, blocksize=blocksize, seed=2, max_k=blocksize - 1)
    meta = linear_meta(codes)
    rt = build_runtime(pack_linear(codes), meta)
    cb = codebook.build(rt, meta)
    for band in ("main", "sal"):
        sign, member, stats = band_words(rt, band, meta)
        values = codebook.book(stats).float()[:, rt[f"{band}_wgrp"].long().repeat_interleave(32)]
        code = unpack_words(sign).long() + 2 * unpack_words(member).long()
        want = torch.gather(values, -1, code[..., None]).squeeze(-1)  # (R, 32 W)
        got = _emulate_codebook(cb, rt, meta, band)
        slots = tile_slots(70, band_rows(band, meta))
        live = slots >= 0
        assert torch.equal(got[live], want[slots[live]]), band
        assert not got[~live].any(), band
    assert cb["book_main"].dtype == torch.float16 and cb["cb_main"].dtype == torch.int32

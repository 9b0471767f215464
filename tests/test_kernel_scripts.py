"""The kernel anatomy and variant scripts patch kernel source text: every patch must still apply
to the kernel it cuts (a kernel edit that breaks one fails here, on the CPU)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import cb_anatomy  # noqa: E402
import lut_anatomy  # noqa: E402
import lut_variants  # noqa: E402

from hbllm.packed import cuda_codebook, cuda_lut  # noqa: E402


def test_every_patch_applies_once():
    """``patched`` asserts each replaced text occurs exactly once; a variant with patches changes
    the source and one without leaves it alone."""
    for script, kernel in ((lut_anatomy, cuda_lut), (lut_variants, cuda_lut), (cb_anatomy, cuda_codebook)):
        for name, patches in script.PATCHES.items():
            src = lut_anatomy.patched(kernel.SOURCE, name, script.PATCHES)
            assert (src != kernel.SOURCE) == bool(patches), (script.__name__, name)
    for variant in lut_variants.VARIANTS:  # the composed variants the script times
        lut_anatomy.patched(cuda_lut.SOURCE, variant, lut_variants.PATCHES)


def test_sass_loops_finds_the_block_loop():
    """``sass_count.loops``: a backward branch around MMA work is a loop (its body counted from
    the label to the branch); a forward branch and a loop without MMA or shared loads are not."""
    import sass_count

    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDS.128 R4, [R2] ;
        /*0020*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0030*/              @P0  BRA `(.L_x_1) ;
        /*0040*/              @P1  BRA `(.L_x_2) ;
.L_x_3:
        /*0050*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0060*/              @P2  BRA `(.L_x_3) ;
.L_x_2:
        /*0070*/                   EXIT ;
"""
    found = sass_count.loops(text)
    assert [(n, dict(c)) for n, c in found] == [(3, {"LDS": 1, "HMMA": 1, "BRA": 1})]


def test_tile_timeline_steps():
    """``tile_timeline.timeline``: steps are differences of consecutive clock stamps, turned into
    microseconds by the clock rate the warps' own clock and global-timer spans give; start skew
    and span come from the global timer."""
    import tile_timeline
    import torch

    stamps = torch.zeros(3, 16, dtype=torch.int64)
    for w in range(3):  # 2 cycles a ns; warp w starts at w * 100 ns and its steps take (k+1) us
        clocks = [0]
        for k in range(6):
            clocks.append(clocks[-1] + 2000 * (k + 1) * (1 + w))
        stamps[w, :7] = torch.tensor(clocks) + 7 * w
        stamps[w, 7] = 1000 + 100 * w
        stamps[w, 8] = stamps[w, 7] + (clocks[6] - clocks[0]) // 2
    out = tile_timeline.timeline(stamps)
    assert abs(out["GHz"] - 2.0) < 1e-9
    for k, step in enumerate(tile_timeline.STEPS):
        assert out[step] == (2 * (k + 1), 3 * (k + 1))  # (median warp, slowest warp)
    assert abs(out["start skew"] - 0.2) < 1e-9
    assert out["span"] == (stamps[2, 8] - stamps[0, 7]).item() / 1e3

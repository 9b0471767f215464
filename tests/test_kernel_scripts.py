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

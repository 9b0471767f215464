"""Packed format: bit packing, pack/unpack round trip, and the torch band path vs dequantize."""
import pytest
import torch

from hbllm.packed.codes import dequantize, from_quantizer
from hbllm.packed.format import linear_meta, pack_linear, packbits, unpack_linear, unpackbits
from hbllm.packed.module import PackedLinear
from hbllm.packed.runtime import build_runtime, pack_words, torch_forward, unpack_words
from packed_synthetic import random_codes

CASES = [("row", False, "exact"), ("row", True, "exact"), ("col", False, "exact"),
         ("col", True, "authors"), ("row", False, "authors")]


def test_packbits_roundtrip_odd_length():
    bits = torch.rand(3, 7, 5) < 0.5
    packed = packbits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-bits.numel() // 8)
    assert torch.equal(unpackbits(packed, bits.shape), bits)


def test_words_roundtrip_includes_bit31():
    bits = torch.rand(4, 96) < 0.5
    bits[:, 31] = True
    words = pack_words(bits)
    assert words.dtype == torch.int32 and (words < 0).any()
    assert torch.equal(unpack_words(words), bits)


@pytest.mark.parametrize("layout,shared,inverse", CASES)
def test_pack_unpack_exact(layout, shared, inverse):
    codes = random_codes(layout, 16, 256, shared=shared, inverse=inverse, seed=1)
    t = pack_linear(codes)
    back = unpack_linear(t, linear_meta(codes))
    assert torch.equal(dequantize(back), dequantize(codes))
    assert torch.equal(pack_linear(back)["sign_main"], t["sign_main"])
    for k, v in pack_linear(back).items():
        assert torch.equal(v, t[k]), k


@pytest.mark.parametrize("layout,shared,inverse", CASES)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_torch_forward_matches_dequantized_matmul(layout, shared, inverse, batch):
    codes = random_codes(layout, 24, 384, shared=shared, inverse=inverse, seed=batch,
                         zero_k_block=(batch == 3))
    w = dequantize(codes).double()
    rt = build_runtime(pack_linear(codes), linear_meta(codes))
    x = torch.randn(batch, 384)
    y = torch_forward(x, rt, linear_meta(codes)).double()
    ref = x.double() @ w.T
    assert (y - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("layout", ["row", "col"])
def test_salient_words_of_each_block(layout):
    """``sal_first[b]`` .. ``sal_first[b+1]-1`` are the salient words of block b, ceil(k/32) of them
    (k up to the whole block; block 0 has none)."""
    codes = random_codes(layout, 8, 512, max_k=128, seed=4, zero_k_block=True)
    rt = build_runtime(pack_linear(codes), linear_meta(codes))
    counts = torch.tensor([len(b.salient) for b in codes.blocks])
    words = rt["sal_first"].diff()
    assert words.tolist() == ((counts + 31) // 32).tolist() and words[0] == 0
    assert rt["sal_first"][0] == 0 and rt["sal_first"][-1] == rt["sal_wgrp"].numel()
    for b in range(len(codes.blocks)):
        assert (rt["sal_wgrp"][rt["sal_first"][b]:rt["sal_first"][b + 1]] == b).all()


def test_dequantize_independent_of_band_form():
    """Columns of W rebuilt from the band path equal the block-wise reconstruction."""
    codes = random_codes("row", 8, 128, seed=3)
    rt = build_runtime(pack_linear(codes), linear_meta(codes))
    eye = torch.eye(128)
    w_band = torch_forward(eye, rt, linear_meta(codes)).T
    assert torch.allclose(w_band, dequantize(codes), atol=1e-6)


def test_packed_linear_cpu_bias_and_3d_input():
    codes = random_codes("row", 32, 256, seed=5)
    bias = torch.randn(32)
    mod = PackedLinear(pack_linear(codes), linear_meta(codes), bias)
    x = torch.randn(2, 5, 256)
    ref = x.double() @ dequantize(codes).double().T + bias.double()
    y = mod(x)
    assert y.shape == (2, 5, 32)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    with pytest.raises(ValueError, match="last dim 256"):
        mod(torch.randn(3, 128))


def test_from_quantizer_rejects_other_methods_and_partial_blocks():
    import hbllm
    from hbllm.config import QuantConfig

    w, x = torch.randn(8, 192), torch.randn(64, 192)
    h = 2 / 64 * x.T @ x
    billm = hbllm.quantize_weight(w, h, QuantConfig(method="billm", blocksize=64), return_codes=True)
    with pytest.raises(ValueError, match="HBLLM codes"):
        from_quantizer(billm.codes, 8, 192, 64, "row", "exact")
    quant = QuantConfig(method="hbllm", blocksize=128)
    res = hbllm.quantize_weight(w, h, quant, return_codes=True)  # blocks of 128 and 64 columns
    with pytest.raises(ValueError, match="divisible by blocksize"):
        from_quantizer(res.codes, 8, 192, 128, "row", "exact")

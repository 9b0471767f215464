"""ARB-LLM (hbllm.quant.arbllm) against its loop reference (tests/reference_arbllm.py), its codes
and bits, and the properties the paper claims for alternating refinement."""
import pytest
import torch

import reference_arbllm as ref
from hbllm.quant.arbllm import ArbCodes, arb1, arb2, arb_bits, arb_block, plain_split, rc1, rc2, refine_x, salient_split
from hbllm.quant.binarize import binarize, binarize2
from hbllm.quant.gptq import upper_inverse_cholesky

ROWS, COLS = 8, 20


@pytest.fixture(scope="module")
def block():
    """A float64 block with uneven column scales, its d = diag(U) and its Hessian block."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(ROWS, COLS, generator=g) * torch.rand(1, COLS, generator=g) ** 2).double()
    x = torch.randn(128, COLS, generator=g) @ (torch.eye(COLS) + 0.3 * torch.randn(COLS, COLS, generator=g))
    h = (2 / 128 * x.T @ x).double()
    U, _ = upper_inverse_cholesky(h, 0.01)
    return w, U.diagonal(), h


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cgb,split_on", [(True, "t"), (False, "t"), (True, "w")])
@pytest.mark.parametrize("variant", ["x", "rc"])
def test_block_matches_reference(block, variant, cgb, split_on):
    w, d, h = block
    kw = dict(S=h, up_lim=8, iters=6, x_iters=6, cgb=cgb, split_on=split_on)
    q, sal, codes = arb_block(w, d, variant, **kw)
    q_ref, sal_ref = ref.arb_block(w, d, variant, **kw)
    assert sal.tolist() == sal_ref
    assert rel(q, q_ref) < 1e-9
    assert isinstance(codes, ArbCodes)


def test_splits_match_reference():
    """Both CGB searches; the case is one where the calibration-weighted choice (ARB-X) differs
    from the squared-error one, so each criterion is checked."""
    g = torch.Generator().manual_seed(10)
    t = (torch.randn(8, 20, generator=g, dtype=torch.float64)
         * torch.rand(1, 20, generator=g, dtype=torch.float64) ** 2) ** 2
    a = torch.randn(64, 20, generator=g, dtype=torch.float64) @ (
        torch.eye(20, dtype=torch.float64) + torch.randn(20, 20, generator=g, dtype=torch.float64))
    S, sal = a.T @ a, torch.tensor([2, 5, 11])
    weighted, plain = plain_split(t, sal, S, 6), plain_split(t, sal, None, 6)
    assert bool((weighted != plain).any())
    assert torch.equal(weighted, ref.plain_split(t, sal.tolist(), S, 6))
    assert torch.equal(plain, ref.plain_split(t, sal.tolist(), None, 6))
    assert torch.equal(salient_split(t[:, sal]), ref.salient_split(t[:, sal]))


@pytest.mark.parametrize("cgb", [True, False])
@pytest.mark.parametrize("variant", ["x", "rc"])
def test_codes_rebuild_block_and_count_full_bits(block, variant, cgb):
    w, d, h = block
    q, sal, codes = arb_block(w.float(), d.float(), variant, S=h.float(), up_lim=8, cgb=cgb)
    assert torch.allclose(codes.dequantize(sal, COLS), q, rtol=0, atol=1e-6)
    assert codes.sal_sign.dtype == torch.int8 and codes.sign.dtype == torch.int8
    assert (codes.sal_upper is not None) == cgb
    paper, full = arb_bits(variant, ROWS, COLS, sal.numel(), 128, cgb)
    assert codes.stored_bits(128) == full
    assert paper == ROWS * (COLS + sal.numel())


def test_bits_formulas():
    # x: signs R(C+k) + CGB bits RC + 7-bit indices + fp16 (4 + 6) per row
    assert arb_bits("x", 4096, 128, 10, 128) == (4096 * 138, 4096 * 138 + 4096 * 128 + 70 + 16 * 10 * 4096)
    # rc: row scales 2 + 2*2 per row, column scales 2 (C-k) + 2*2 k
    assert arb_bits("rc", 4096, 128, 10, 128) == (
        4096 * 138, 4096 * 138 + 4096 * 128 + 70 + 16 * (6 * 4096 + 2 * 118 + 4 * 10))
    # without CGB the salient entries carry no membership bit and one group of statistics
    assert arb_bits("x", 64, 32, 4, 128, cgb=False)[1] == 64 * 36 + 64 * 28 + 28 + 16 * 7 * 64
    with pytest.raises(ValueError, match="variant"):
        arb_bits("arb", 4, 4, 1, 128)


def test_block_rejects_bad_arguments(block):
    w, d, h = block
    with pytest.raises(ValueError, match="variant"):
        arb_block(w, d, "xrc", S=h)
    with pytest.raises(ValueError, match="Hessian"):
        arb_block(w, d, "x")
    with pytest.raises(ValueError, match="split_on"):
        arb_block(w, d, "rc", split_on="T")


def groups(shape=(2, 64, 48), seed=1):
    """Random heavy-tailed rows and two complementary group masks."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape[1:], generator=g, dtype=torch.float64) ** 3)
    up = x.abs() > x.abs().median()
    return x[None].expand(shape), torch.stack((~up, up)).double()


def err(x, m, q):
    return float(((x - q) * m).square().sum())


def test_arb_starts_at_one_shot_and_lowers_its_error():
    x, m = groups()
    mu, a, b = arb1(x, m, 0)
    one = binarize(x, m.bool(), "abs").q
    assert torch.allclose((mu + a * b) * m, one, atol=1e-12)
    mu, a, b = arb1(x, m, 15)
    assert err(x, m, (mu + a * b) * m) < 0.99 * err(x, m, one)
    first, second = binarize2(x, m.bool())
    mu, (a0, a1), (b0, b1) = arb2(x, m, 15)
    two = first.q + second.q
    assert err(x, m, (mu + a0 * b0 + a1 * b1) * m) < 0.99 * err(x, m, two)


def trajectory(fn, x, m, n=8):
    return [fn(x, m, i) for i in range(n + 1)]


@pytest.mark.parametrize("order", ["arb1", "arb2", "rc1", "rc2"])
def test_error_never_increases_with_iterations(order):
    """Every update is an exact coordinate minimizer of the squared error, so it cannot grow."""
    x, m = groups()

    def q_of(i):
        if order == "arb1":
            mu, a, b = arb1(x, m, i)
            return (mu + a * b) * m
        if order == "arb2":
            mu, (a0, a1), (b0, b1) = arb2(x, m, i)
            return (mu + a0 * b0 + a1 * b1) * m
        if order == "rc1":
            ar, ac, b = rc1(x, m, i)
            return ar * ac * b
        (r0, r1), (c0, c1), (b0, b1) = rc2(x, m, i)
        return r0 * c0 * b0 + r1 * c1 * b1

    errs = [err(x, m, q_of(i)) for i in range(9)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.999 * errs[0]


@pytest.mark.parametrize("order", [1, 2])
def test_x_refinement_lowers_the_calibration_weighted_error(order):
    x, m = groups((2, 16, 24))
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 24, generator=g, dtype=torch.float64) @ (
        torch.eye(24, dtype=torch.float64) + 0.5 * torch.randn(24, 24, generator=g, dtype=torch.float64))
    S = a.T @ a
    if order == 1:
        mu, al, b = arb1(x, m, 15)
        al, planes = (al,), (b,)
    else:
        mu, al, planes = arb2(x, m, 15)

    def xerr(mu, al):
        e = (x - mu - sum(a_ * b_ for a_, b_ in zip(al, planes))) * m
        return float(((e @ S) * e).sum())

    errs = [xerr(*refine_x(x, m, mu, al, planes, S, i)) if i else xerr(mu, al) for i in range(7)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.99 * errs[0]


@pytest.mark.parametrize("method,variant", [("arbllm_x", "x"), ("arbllm_rc", "rc")])
def test_registry_method_is_arb_block_under_the_gptq_loop(method, variant):
    """quantize_weight(method) is arb_block over blocks of 16 columns, each given its slice of the
    raw Hessian and the config's fields, its error compensated on the later columns (a loop
    written out here, with the same exact power-of-two normalization of each block)."""
    from hbllm.config import QuantConfig
    from hbllm.quant import quantize_weight

    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 32, generator=g)
    x = torch.randn(128, 32, generator=g) @ (torch.eye(32) + 0.3 * torch.randn(32, 32, generator=g))
    h = 2 / 128 * x.T @ x
    cfg = QuantConfig(method=method, blocksize=16, up_lim=8, arb_iters=4, arb_split_on="w", cgb=False)
    got = quantize_weight(w, h, cfg).weight
    U, _ = upper_inverse_cholesky(h, 0.01)
    W = w.clone()
    for s in (0, 16):
        e = s + 16
        unit = 2 ** torch.floor(torch.log2(W[:, s:e].abs().amax()))
        q, _, _ = arb_block(W[:, s:e] / unit, U.diagonal()[s:e], variant, S=h[s:e, s:e], up_lim=8,
                            iters=4, x_iters=15, cgb=False, split_on="w")
        q = q * unit
        err = (W[:, s:e] - q) / U.diagonal()[s:e]
        W[:, s:e] = q
        W[:, e:] -= err @ U[s:e, e:]
    assert torch.equal(got, W)

"""Haar, binarizers, split search and salient k search: properties and brute force."""
import math

import pytest
import torch

import reference_quant as ref
from hbllm.quant.binarize import binarize, binarize2
from hbllm.quant.haar import haar_forward, haar_inverse
from hbllm.quant.saliency import k_errors, select_salient
from hbllm.quant.split_search import quantile_levels, sorted_quantiles, split_binarize


def test_haar_orthonormal_and_exact_inverse():
    x = torch.randn(6, 10, dtype=torch.float64)
    for dim in (0, 1):
        if x.shape[dim] % 2:
            continue
        low, high = haar_forward(x, dim)
        assert torch.allclose(low.square().sum() + high.square().sum(), x.square().sum())
        assert torch.allclose(haar_inverse(low, high, dim, "exact"), x, atol=1e-12)
        neighbour = x[0, 1] if dim == 1 else x[1, 0]
        assert torch.allclose(low[0, 0], (x[0, 0] + neighbour) / math.sqrt(2))
        assert torch.allclose(high[0, 0], (x[0, 0] - neighbour) / math.sqrt(2))
    # matrix of the transform is orthogonal
    eye = torch.eye(8, dtype=torch.float64)
    m = torch.cat(haar_forward(eye, 1), 1)
    assert torch.allclose(m @ m.T, eye, atol=1e-12)
    # the authors' inverse constant makes the reconstruction 0.70703125 * sqrt(2) as large
    low, high = haar_forward(x, 1)
    assert torch.allclose(haar_inverse(low, high, 1, "authors"), x * 0.70703125 * math.sqrt(2))


def test_haar_odd_length_fails_clearly():
    with pytest.raises(ValueError, match="even length"):
        haar_forward(torch.randn(3, 4), 0)


def _grid_best(x, m, q_of_a):
    grid = torch.linspace(0, 3, 3001, dtype=torch.float64)
    errs = torch.stack([((x - q_of_a(a)) ** 2).sum() for a in grid])
    return float(grid[errs.argmin()])


def test_b1_abs_scale_is_l2_optimal_for_its_mean():
    x = torch.randn(1, 200, dtype=torch.float64) * 2 + 0.3
    b = binarize(x, torch.ones_like(x, dtype=torch.bool), "abs")
    m = x.mean()
    best = _grid_best(x, m, lambda a: torch.sign(x - m) * a + m)
    assert float(b.scale) == pytest.approx(best, abs=2e-3)
    assert torch.allclose(b.mean, m.view(1, 1))


def test_b1_rms_scale_matches_the_second_moment():
    x = torch.randn(3, 50, dtype=torch.float64)
    mask = torch.rand(3, 50) < 0.6
    b = binarize(x, mask, "rms")
    for r in range(3):
        xs = x[r, mask[r]]
        m = xs.mean()
        assert float(b.mean[r]) == pytest.approx(float(m))
        # the RMS scale keeps the group's energy around its mean
        assert float(((b.q[r, mask[r]] - m) ** 2).mean()) == pytest.approx(float(((xs - m) ** 2).mean()))
    assert (b.q[~mask] == 0).all()


def test_shared_mean_and_empty_rows():
    x = torch.randn(2, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = True
    mean = torch.full((2, 1), 0.25)
    b = binarize(x, mask, "rms", mean=mean)
    assert (b.mean == 0.25).all() and (b.q[1] == 0).all()
    expected = torch.sign(x[0, :3] - 0.25) * ((x[0, :3] - 0.25) ** 2).mean().sqrt() + 0.25
    assert torch.allclose(b.q[0, :3], expected)


def test_b2_second_order_reduces_error_and_matches_reference():
    x = torch.randn(4, 64)
    first, second = binarize2(x, torch.ones_like(x, dtype=torch.bool))
    assert ((x - first.q - second.q) ** 2).sum() < ((x - first.q) ** 2).sum()
    for r in range(4):
        assert torch.allclose(first.q[r] + second.q[r], ref.b2(x[r]), atol=1e-6)


def test_sorted_quantiles_equal_torch_quantile():
    x = torch.randn(5, 37).abs()
    q = quantile_levels("row")
    assert torch.equal(sorted_quantiles(x.sort(-1).values, q), torch.quantile(x, q, dim=1).T)


@pytest.mark.parametrize("shared_mean", [False, True])
@pytest.mark.parametrize("scale", ["rms", "abs"])
def test_row_split_picks_best_candidate_per_row(shared_mean, scale):
    x = torch.randn(7, 40)
    q, codes = split_binarize(x, "row", shared_mean, scale)
    levels = quantile_levels("row")
    for r in range(7):
        errs = [float(((x[r] - ref.binarize_split_row(x[r], t, scale, shared_mean)) ** 2).sum())
                for t in torch.quantile(x[r].abs(), levels)]
        assert float(((x[r] - q[r]) ** 2).sum()) == pytest.approx(min(errs), rel=1e-5)
    assert torch.allclose(codes.dequantize()[0], q)
    assert codes.mean.shape[-1] == (1 if shared_mean else 2)


def test_global_split_picks_best_single_threshold():
    x = torch.randn(6, 30)
    q, codes = split_binarize(x, "global")
    errs = []
    for t in torch.quantile(x.abs().flatten(), quantile_levels("global")):
        qq = torch.stack([ref.binarize_split_row(x[r], t, "rms", False) for r in range(6)])
        errs.append(float(((x - qq) ** 2).sum()))
    assert float(((x - q) ** 2).sum()) == pytest.approx(min(errs), rel=1e-5)
    # one threshold: every upper entry is at least as large as every lower entry
    assert x.abs()[codes.upper[0]].min() >= x.abs()[~codes.upper[0]].max()


def test_k_search_equals_brute_force():
    g = torch.Generator().manual_seed(5)
    target = torch.randn(8, 40, generator=g).square()
    u = 12
    ks = torch.arange(1, u)
    brute = []
    for k in range(1, u):
        qq = torch.zeros_like(target)
        for r in range(8):
            qq[r, :k], qq[r, k:] = ref.b2(target[r, :k]), ref.b2(target[r, k:])
        brute.append(float(((target - qq) ** 2).sum()))
    fast = k_errors(target, ks, u)
    assert torch.allclose(fast, torch.tensor(brute, dtype=torch.float64), rtol=1e-5)
    w, d = torch.randn(8, 40, generator=g), torch.rand(40, generator=g) + 0.5
    for metric in ("l2", "l1", "magnitude"):
        assert select_salient(w, d, metric, u).tolist() == ref.select_salient(w, d, metric, u)


def test_split_search_is_memory_lean():
    """A LLaMA gate_proj band (11008 x 64, 41 thresholds) needs no (thresholds x rows x cols)
    temporary: peak extra memory stays far below one such tensor (115 MB)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(11008, 64)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        split_binarize(x, "row")
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest < 41 * 11008 * 64 * 4 / 4

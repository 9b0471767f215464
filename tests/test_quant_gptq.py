"""GPTQ block loop, layouts, baselines, bits, codes and the public API."""
import pytest
import torch

from hbllm.config import QuantConfig
from hbllm.quant import quantize_block, quantize_weight, upper_inverse_cholesky
from hbllm.quant.bits import index_bits
from hbllm.quant.hbllm import fill_avg


def heavy_tailed_problem(rows=64, cols=256, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(2.5).sample((rows, cols)) * 0.02
    x = torch.randn(tokens, 32, generator=g) @ torch.randn(32, cols, generator=g) / 4
    x = x + torch.randn(tokens, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[:4]] *= 15
    return w, 2 / tokens * x.T @ x, x


def test_fill_avg_at_block_edges():
    w = torch.randn(3, 10)
    out = fill_avg(w, torch.tensor([0, 2, 8, 9]))
    assert torch.allclose(out[:, 0], w[:, [1, 3]].mean(1))  # window [0, 3]
    assert torch.allclose(out[:, 2], w[:, [1, 3, 4, 5]].mean(1))  # window [0, 5]
    assert torch.allclose(out[:, 8], w[:, [5, 6, 7]].mean(1))  # window [5, 9]
    assert torch.allclose(out[:, 9], w[:, [6, 7]].mean(1))  # window [6, 9]
    assert torch.equal(out[:, [1, 3, 4, 5, 6, 7]], w[:, [1, 3, 4, 5, 6, 7]])
    # runs of salient columns whose windows hold no non-salient column
    w = torch.randn(3, 12)
    out = fill_avg(w, torch.arange(0, 8))
    assert torch.equal(out[:, 0], w[:, 8]) and torch.equal(out[:, 3], w[:, 8])  # nothing left: right
    assert torch.equal(out[:, 5], w[:, 8])  # window [2, 8]
    assert torch.allclose(out[:, 7], w[:, 8:11].mean(1))  # window [4, 10]
    out = fill_avg(w, torch.arange(4, 12))
    assert torch.equal(out[:, 11], w[:, 3]) and torch.equal(out[:, 7], w[:, 3])  # nearest left
    assert torch.equal(out[:, 6], w[:, 3])  # window [3, 9]
    assert torch.allclose(out[:, 4], w[:, 1:4].mean(1))  # window [1, 7]


def test_diagonal_hessian_equals_plain_blockwise_quantization():
    w, _, _ = heavy_tailed_problem(rows=16, cols=96)
    h = torch.diag(torch.rand(96) + 0.5)
    cfg = QuantConfig(method="hbllm", blocksize=32)
    res = quantize_weight(w, h, cfg)
    u, _ = upper_inverse_cholesky(h, cfg.percdamp)
    blocks = [quantize_block(w[:, s:s + 32], u.diagonal()[s:s + 32], cfg)[0] for s in range(0, 96, 32)]
    assert torch.allclose(res.weight, torch.cat(blocks, 1), atol=1e-6)


def test_disable_gptq_skips_compensation():
    w, h, _ = heavy_tailed_problem(rows=16, cols=96)
    on = quantize_weight(w, h, QuantConfig(blocksize=32))
    off = quantize_weight(w, h, QuantConfig(blocksize=32, disable_gptq=True))
    u, _ = upper_inverse_cholesky(h, 0.01)
    cfg = QuantConfig(blocksize=32)
    blocks = [quantize_block(w[:, s:s + 32], u.diagonal()[s:s + 32], cfg)[0] for s in range(0, 96, 32)]
    assert torch.allclose(off.weight, torch.cat(blocks, 1), atol=1e-6)
    assert not torch.allclose(on.weight, off.weight)
    assert torch.equal(on.weight[:, :32], off.weight[:, :32])


def test_output_error_orders_hbllm_billm_sign():
    w, h, x = heavy_tailed_problem()
    errs = {}
    for method in ("hbllm", "billm", "sign"):
        q = quantize_weight(w, h, QuantConfig(method=method)).weight
        errs[method] = float(((x @ (w - q).T) ** 2).sum())
    assert errs["hbllm"] < errs["billm"] < errs["sign"], errs


def test_dead_columns_and_dtype_device():
    w, h, _ = heavy_tailed_problem(rows=16, cols=64)
    h[5, :] = 0
    h[:, 5] = 0
    res = quantize_weight(w.half(), h, QuantConfig(blocksize=32))
    assert res.weight.dtype == torch.float16 and res.weight.shape == w.shape
    assert torch.isfinite(res.weight).all() and res.numel == w.numel()
    assert res.row_loss.shape == (16,) and res.loss == pytest.approx(float(res.row_loss.sum()))
    none = quantize_weight(w, h, QuantConfig(method="none"))
    assert none.weight is w and none.loss == 0.0 and none.bits == {"paper": 16.0, "full": 16.0}


def test_clear_errors():
    with pytest.raises(ValueError, match="quant.layout"):
        QuantConfig(layout="diagonal")
    with pytest.raises(ValueError, match="blocksize"):
        QuantConfig(blocksize=7)
    with pytest.raises(ValueError, match="rows=15 must be even"):
        quantize_weight(torch.randn(15, 32), torch.eye(32), QuantConfig())
    with pytest.raises(ValueError, match="cols=33 must be even"):
        quantize_weight(torch.randn(16, 33), torch.eye(33), QuantConfig())
    with pytest.raises(ValueError, match="hessian must be"):
        quantize_weight(torch.randn(16, 32), torch.eye(16), QuantConfig())
    with pytest.raises(ValueError, match="positive definite"):
        quantize_weight(torch.randn(16, 32), -torch.eye(32), QuantConfig(percdamp=0.0))
    assert QuantConfig(method="billm").salient_metric == "l1"
    assert QuantConfig().salient_metric == "l2"


def _block_bits(R, C, k, **kw):
    """(paper, full) of the registry's formula for one (R, C) block with k salient columns
    (``d`` chosen so that exactly the first k columns of a random block are salient)."""
    cfg = QuantConfig(blocksize=C, **kw)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(R, C, generator=g)
    w[:, :k] *= 50
    _, codes = quantize_block(w, torch.ones(C), cfg)
    assert codes.salient.tolist() == list(range(k))
    return cfg.spec.bits(cfg, codes)


def test_full_bits_hand_count():
    """Rows 4, one block of 8 columns, k salient columns, blocksize 8 (3-bit indices)."""
    R, C, k = 4, 8, 2
    # row layout: 2 bands of 4x4 -> 32 sign + 32 membership bits, 2 bands x 4 rows x 4 fp16;
    # salient residual: 2 bands of 2x2 -> 8 sign + 8 membership, 2 bands x 2 rows x 4 fp16; 2 indices
    hand_row = 32 + 32 + 2 * 4 * 4 * 16 + 8 + 8 + 2 * 2 * 4 * 16 + 2 * 3
    assert _block_bits(R, C, k, method="hbllm", layout="row", up_lim=3) == (32 + 8, hand_row)
    # shared mean: 3 fp16 per band row instead of 4
    assert _block_bits(R, C, k, method="hbllm", shared_mean=True, up_lim=3)[1] == hand_row - 2 * 4 * 16
    # col layout: bands 2x6 -> 24 sign + 24 membership, 2 bands x 2 rows x 4 fp16; same residual
    hand_col = 24 + 24 + 2 * 2 * 4 * 16 + 8 + 8 + 2 * 2 * 4 * 16 + 2 * 3
    assert _block_bits(R, C, k, method="hbllm", layout="col", up_lim=3) == (32, hand_col)
    # billm: 4x6 -> sign + membership, 4 rows x 4 fp16; salient 4x2 B2 -> 2 signs, 4 fp16 per row
    assert _block_bits(R, C, k, method="billm", up_lim=3) == (24 + 16, 48 + 4 * 64 + 16 + 4 * 64 + 6)
    assert _block_bits(R, C, 0, method="sign") == (32, 32 + 4 * 32)
    assert index_bits(128) == 7


@pytest.mark.parametrize("kw", [dict(method="hbllm"), dict(method="hbllm", layout="col"),
                                dict(method="hbllm", shared_mean=True, partition="global"),
                                dict(method="billm"), dict(method="sign")])
def test_codes_rebuild_the_weight_and_count_the_full_bits(kw):
    w, h, _ = heavy_tailed_problem(rows=16, cols=96)
    cfg = QuantConfig(blocksize=32, **kw)
    res = quantize_weight(w, h, cfg, return_codes=True)
    rebuilt = torch.cat([c.dequantize() for c in res.codes], 1)
    assert torch.allclose(rebuilt, res.weight, atol=1e-6)
    full = sum(c.stored_bits() for c in res.codes)
    assert full == sum(b[1] for b in res.block_bits)
    assert res.bits["full"] == pytest.approx(full / w.numel())
    assert 1.0 <= res.bits["paper"] < 1.5

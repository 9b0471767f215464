"""Bits per weight, exactly: the formulas of docs/quantizers.md ("Bits", docs/method.md section 7)
evaluated by hand for every method, the codes each method returns counted field by field, and
the bytes of HBLLM's packed checkpoint. Only the public API is used (``hbllm.quantize_weight``,
``QuantResult.bits/salient/codes``, ``hbllm.pack``)."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import hbllm

ROWS, BLOCKSIZE = 16, 32
FP = 16  # bits of one stored fp16 statistic


def problem(cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(2.5).sample((ROWS, cols)) * 0.02
    x = torch.randn(256, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[:3]] *= 20  # outlier inputs: some salient columns
    return w, 2 / 256 * x.T @ x


def hand_bits(cfg, R: int, C: int, k: int) -> tuple:
    """(paper, full) bits of one block of R rows, C columns, k salient (docs/quantizers.md)."""
    IDX = math.ceil(math.log2(cfg.blocksize))
    S = FP * (3 if cfg.shared_mean else 4)
    residual = 2 * R * k + 2 * (R // 2) * 4 * FP + k * IDX
    if cfg.method == "hbllm" and cfg.layout == "row":
        return R * C + R * k, 2 * R * C + 2 * R * S + residual
    if cfg.method == "hbllm":
        return R * (C - k) + R * k, 2 * R * (C - k) + 2 * (R // 2) * S + residual
    if cfg.method == "billm":
        return R * (C - k) + 2 * R * k, 2 * R * (C - k) + 64 * R + 2 * R * k + 64 * R + k * IDX
    if cfg.method.startswith("arbllm"):  # docs/arbllm.md: signs, CGB bits, indices, fp16 stats
        n, G = C - k, 2 if cfg.cgb else 1
        paper = R * n + 2 * R * k
        member = R * n + (R * k if cfg.cgb else 0)
        stats = (2 * 2 * R + G * 3 * R if cfg.method == "arbllm_x"  # (mean, alpha) / (mean, a0, a1)
                 else 2 * (R + n) + G * 2 * (R + k))  # rc: row scales and column scales per group
        return paper, paper + member + k * IDX + FP * stats
    assert cfg.method == "sign" and k == 0
    return R * C, R * C + 32 * R


def code_bits(codes, index_bits: int) -> int:
    """Bits of what the codes hold, by field: one per sign and group-membership entry, 16 per
    mean and scale, ``index_bits`` per salient column index; ``q`` (the dequantized values,
    rebuilt from the rest) and the block's start/end are not stored."""
    per_entry = {"sign": 1, "upper": 1, "mean": FP, "scale": FP, "salient_idx": index_bits,
                 "salient": index_bits, "sal_sign": 1, "sal_upper": 1,  # ARB-LLM's ArbCodes
                 "sal_row": FP, "row": FP, "sal_col": FP, "col": FP}
    if torch.is_tensor(codes):
        raise AssertionError("a bare tensor in the codes: name it in code_bits")
    if isinstance(codes, dict):
        items = codes.items()
    elif hasattr(codes, "_fields"):  # NamedTuple
        items = zip(codes._fields, codes)
    elif dataclasses.is_dataclass(codes):  # the methods' typed block codes
        items = ((f.name, getattr(codes, f.name)) for f in dataclasses.fields(codes))
    elif isinstance(codes, (tuple, list)):
        return sum(code_bits(c, index_bits) for c in codes)
    else:
        raise AssertionError(f"unknown code type {type(codes).__name__}")
    total = 0
    for name, value in items:
        if name in ("start", "end", "q"):
            continue
        if value is None:  # an ArbCodes part the variant does not have
            continue
        if isinstance(value, (str, int, float)):  # layout, Haar constant, blocksize, width: config
            continue
        if torch.is_tensor(value):
            assert name in per_entry, f"unknown code field {name!r}: count it in code_bits"
            total += per_entry[name] * value.numel()
        else:
            total += code_bits(value, index_bits)
    return total


METHODS = {
    "hbllm_row": dict(method="hbllm", layout="row"),
    "hbllm_col": dict(method="hbllm", layout="col"),
    "hbllm_row_shared": dict(method="hbllm", layout="row", shared_mean=True),
    "hbllm_col_shared_global": dict(method="hbllm", layout="col", shared_mean=True,
                                    partition="global"),
    "billm": dict(method="billm"),
    "sign": dict(method="sign"),
    "arbllm_x": dict(method="arbllm_x"),
    "arbllm_rc": dict(method="arbllm_rc"),
    "arbllm_x_nocgb": dict(method="arbllm_x", cgb=False),
    "arbllm_rc_nocgb": dict(method="arbllm_rc", cgb=False),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bits_equal_the_hand_formulas_and_the_codes(name):
    """80 columns at blocksize 32: blocks of 32, 32 and a partial 16."""
    cfg = hbllm.QuantConfig(blocksize=BLOCKSIZE, **METHODS[name])
    w, h = problem(80)
    res = hbllm.quantize_weight(w, h, cfg, return_codes=True)
    widths = [32, 32, 16]
    ks = [int(s.numel()) for s in res.salient]
    assert len(ks) == 3
    if cfg.method == "sign":
        assert ks == [0, 0, 0]
    else:
        assert all(0 < k < C for k, C in zip(ks, widths)), ks  # the outliers are salient
    blocks = [hand_bits(cfg, ROWS, C, k) for C, k in zip(widths, ks)]
    assert res.bits["paper"] == sum(b[0] for b in blocks) / w.numel()
    assert res.bits["full"] == sum(b[1] for b in blocks) / w.numel()
    stored = [code_bits(c, math.ceil(math.log2(BLOCKSIZE))) for c in res.codes]
    assert stored == [b[1] for b in blocks]


@pytest.mark.parametrize("layout,shared", [("row", False), ("col", False), ("row", True)])
def test_packed_bytes_are_the_full_bits_plus_format_overhead(tmp_path, layout, shared):
    """hbllm.pack's tensors, byte by byte (hbllm/packed/format.py): the full bits, except that a
    salient index takes a byte (not ceil(log2 64) = 6 bits), each block stores its salient count
    (int16), and each bit tensor is padded to whole bytes. The format needs blocksize 64k."""
    from safetensors import safe_open

    blocksize, cols = 64, 192
    cfg = hbllm.QuantConfig(method="hbllm", layout=layout, shared_mean=shared,
                            blocksize=blocksize)
    w, h = problem(cols, seed=1)
    res = hbllm.quantize_weight(w, h, cfg, return_codes=True)
    model = nn.Module()
    model.proj = nn.Linear(cols, ROWS, bias=False)
    report = hbllm.pack(model, tmp_path, codes={"proj": res.codes}, quant=cfg)
    with safe_open(str(tmp_path / "linears.safetensors"), "pt") as f:
        got = {k.removeprefix("proj."): f.get_tensor(k).numel() * f.get_tensor(k).element_size()
               for k in f.keys()}

    R, nblk, K = ROWS, cols // blocksize, sum(int(s.numel()) for s in res.salient)
    S = 3 if shared else 4
    main = R * cols if layout == "row" else R * (cols - K)  # one bit per main coefficient
    want = {"sign_main": math.ceil(main / 8), "member_main": math.ceil(main / 8),
            "stats_main": 2 * (R * nblk * 2 * S if layout == "row" else 2 * (R // 2) * nblk * S),
            "sal_index": K, "sal_count": 2 * nblk,
            "sign_sal": math.ceil(R * K / 8), "member_sal": math.ceil(R * K / 8),
            "stats_sal": 2 * 2 * (R // 2) * nblk * 4}
    assert got == want
    full = round(res.bits["full"] * w.numel())  # the full bits of the linear (an integer)
    padding = sum(8 * want[k] for k in ("sign_main", "member_main", "sign_sal", "member_sal")) \
        - 2 * main - 2 * R * K
    assert 8 * sum(got.values()) == full + K * (8 - 6) + 16 * nblk + padding
    assert report["linear_bytes"] == sum(got.values())
    assert report["bits_per_weight"] == 8 * sum(got.values()) / w.numel()

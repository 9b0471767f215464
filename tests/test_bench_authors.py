"""scripts/bench_quantize.py --authors-dir: families whose files are absent are skipped cleanly.

The authors' code is never committed (docs/quantizers.md says how to get it), so CI checks only
the skipping; the comparison against ARB-LLM's files runs where build/authors/arbllm exists.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from hbllm.config import QuantConfig

_spec = importlib.util.spec_from_file_location("bench_quantize",
                                               REPO / "scripts" / "bench_quantize.py")
bench_quantize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_quantize)


def _gptq_only(tmp_path: Path) -> Path:
    """An authors folder holding (empty stand-ins for) the GPTQ files only."""
    (tmp_path / "gptq").mkdir()
    for f in ("gptq.py", "quant.py"):
        (tmp_path / "gptq" / f).write_text("")
    return tmp_path


def test_arbllm_skipped_without_its_folder(tmp_path, capsys, monkeypatch):
    authors = bench_quantize.AuthorsCode(_gptq_only(tmp_path))
    assert authors.methods == {"gptq"}
    assert authors.has("gptq") and not authors.has("arbllm_x") and not authors.has("pbllm")
    w, h = bench_quantize.synthetic_inputs(128, 128, 256, "cpu")
    assert authors.run(QuantConfig(method="arbllm_x"), w, h) is None
    assert authors.run(QuantConfig(method="arbllm_rc"), w, h) is None
    monkeypatch.setattr(sys, "argv", ["bench_quantize.py", "--device", "cpu", "--scale", "0.01",
                                      "--tokens", "256", "--linears", "k_proj", "--methods",
                                      "arbllm_rc", "--authors-dir", str(tmp_path)])
    bench_quantize.main()
    out = capsys.readouterr().out
    assert "arbllm_rc: no authors' code" in out and "(skipped" in out
    assert "arbllm_rc  k_proj" in out  # ours still timed


def test_empty_authors_dir_fails_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="docs/quantizers.md"):
        bench_quantize.AuthorsCode(tmp_path)


ARB = REPO / "build" / "authors" / "arbllm" / "bigptq_arb.py"


@pytest.mark.skipif(not ARB.is_file(), reason="the authors' ARB-LLM files are not in build/authors")
@pytest.mark.parametrize("method", ["arbllm_x", "arbllm_rc"])
def test_arbllm_matches_the_authors_code(method):
    authors = bench_quantize.AuthorsCode(ARB.parents[1])
    w, h = bench_quantize.synthetic_inputs(128, 256, 512, "cpu")
    cfg = QuantConfig(method=method)
    from hbllm.quant import quantize_weight

    ours, theirs = quantize_weight(w, h, cfg).weight, authors.run(cfg, w, h)
    chol = torch.linalg.cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(256))
    err_ours, err_theirs = (bench_quantize.output_error(w, q, chol) for q in (ours, theirs))
    assert abs(err_ours / err_theirs - 1) < 1e-3
    assert "utils" not in sys.modules  # their top-level package name is not left behind

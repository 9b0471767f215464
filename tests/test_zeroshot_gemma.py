"""Zero-shot on the real Gemma-3-270M (pip GGUF) with a small ``limit``: openbookqa from the
real local mirror (/work/shared/data/zeroshot) plus arc_easy from our own small file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, require
from hbllm.config import ZeroShotConfig
from hbllm.eval.zeroshot import run_zeroshot
from hbllm.tasks import local

SHARED = SHARED_DATA / "zeroshot"
OURS = Path(__file__).parent / "data" / "zeroshot"
LIMIT = 10

pytestmark = pytest.mark.slow


@pytest.fixture
def mirror(tmp_path):
    require((SHARED / "openbookqa" / "test.jsonl").is_file(),
            f"real openbookqa mirror missing at {SHARED}")
    (tmp_path / "openbookqa").symlink_to((SHARED / "openbookqa").resolve())
    (tmp_path / "arc_easy").symlink_to((OURS / "arc_easy").resolve())
    return tmp_path


def choice_logprobs(model, tokenizer, context: str, choices):
    """Summed log p(" " + choice | context) per choice, split at the context's tokens the way
    lm-eval does (encode the whole string, drop the context's tokens)."""
    ctx = tokenizer(context).input_ids
    out = []
    for choice in choices:
        whole = tokenizer(context + " " + choice).input_ids
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        cont = torch.tensor(whole[len(ctx):])
        out.append(logp[len(ctx) - 1:-1].gather(1, cont[:, None]).sum().item())
    return out


def test_gemma_two_tasks_local(gemma, mirror):
    """``gemma``: the session fixture of tests/conftest.py."""
    model, tokenizer = gemma
    cfg = ZeroShotConfig(enabled=True, tasks=["openbookqa", "arc_easy"], limit=LIMIT,
                         batch_size=8, local_dir=str(mirror))
    res = run_zeroshot(model, tokenizer, cfg, "cpu")
    assert set(res) == {"openbookqa", "arc_easy", "average", "average_metric"}
    assert res["openbookqa"]["samples"] == LIMIT
    assert res["arc_easy"]["samples"] == 4  # our file has 4 questions
    assert res["average"] == pytest.approx((res["openbookqa"]["acc"] + res["arc_easy"]["acc"]) / 2)

    # lm-eval scored the in-memory model: recompute openbookqa acc / acc_norm by hand
    import datasets

    docs = datasets.load_dataset("json", data_files=str(mirror / "openbookqa" / "test.jsonl"),
                                 split="train").select(range(LIMIT))
    acc = acc_norm = 0
    for doc in docs:
        lls = choice_logprobs(model, tokenizer, doc["question_stem"], doc["choices"]["text"])
        gold = doc["choices"]["label"].index(doc["answerKey"].lstrip())
        normed = [ll / len(" " + c) for ll, c in zip(lls, doc["choices"]["text"])]
        acc += max(range(4), key=lls.__getitem__) == gold
        acc_norm += max(range(4), key=normed.__getitem__) == gold
    assert res["openbookqa"]["acc"] == pytest.approx(acc / LIMIT)
    assert res["openbookqa"]["acc_norm"] == pytest.approx(acc_norm / LIMIT)
    assert local.has_local_data(mirror, "openbookqa")

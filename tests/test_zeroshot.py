"""Zero-shot evaluation (hbllm.eval.zeroshot) on a tiny random Llama with our own small task
files (tests/data/zeroshot, each in the field layout of the hub dataset lm-eval reads)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from hbllm import hub
from hbllm.config import ZEROSHOT_TASKS, ZeroShotConfig
from hbllm.eval import zeroshot
from hbllm.tasks import local

DATA = Path(__file__).parent / "data" / "zeroshot"


def tiny_tokenizer():
    """Byte-level BPE (any text encodes) built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p.read_text() for p in sorted(DATA.glob("*/*.jsonl"))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def tiny_model(vocab_size: int, seed: int = 0):
    """Random LlamaForCausalLM, hidden 64, 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(len(tokenizer))


def quick_cfg(**kw) -> ZeroShotConfig:
    kw.setdefault("local_dir", str(DATA))
    return ZeroShotConfig(enabled=True, batch_size=8, bootstrap_iters=100, **kw)


class GoldLM(HFLM):
    """HFLM whose log-likelihoods are rigged: the gold continuation gets 0 (and is greedy),
    every other choice -10. Gold comes from the lm-eval Task objects themselves."""

    def __init__(self, task_objects, **kw):
        super().__init__(**kw)
        self.task_objects = task_objects

    def _gold(self, inst) -> int:
        task = self.task_objects[inst.task_name]
        if task.multiple_input:  # winogrande: contexts vary, doc_to_text gives the gold index
            return task.doc_to_text(inst.doc)
        target = task.doc_to_target(inst.doc)
        return target if isinstance(target, int) else task.doc_to_choice(inst.doc).index(target)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for inst in requests:
            output_type = self.task_objects[inst.task_name].OUTPUT_TYPE
            if inst.request_type == "loglikelihood" and output_type == "loglikelihood":
                out.append((0.0, True))  # lambada: the target word is the greedy continuation
            else:
                gold = self._gold(inst) == inst.idx
                out.append((0.0 if gold else -10.0, gold))
        return out


def test_nine_tasks_local_mirror(model, tokenizer, capsys):
    """All nine default tasks run from the local mirror; average = mean of the task accs."""
    cfg = quick_cfg()
    assert tuple(cfg.tasks) == ZEROSHOT_TASKS
    t0 = time.time()
    res = zeroshot.run_zeroshot(model, tokenizer, cfg, "cpu")
    elapsed = time.time() - t0
    tasks = list(zeroshot.task_rows(res))
    assert tasks == list(ZEROSHOT_TASKS) and "copa" in tasks and "rte" not in tasks
    assert set(res) == {*tasks, "average", "average_metric"} and res["average_metric"] == "acc"
    for task in tasks:
        n = sum(1 for _ in open(local.find_split(DATA, task, local.eval_split(local.template(task)))[0]))
        assert res[task]["samples"] == n
        metrics = {m["metric"] for m in local.template(task)["metric_list"]}
        assert set(res[task]) == {"samples", *metrics, *(m + "_stderr" for m in metrics)}, task
        assert 0.0 <= res[task]["acc"] <= 1.0
    assert res["lambada_openai"]["perplexity"] > 1.0 and "perplexity_stderr" in res["lambada_openai"]
    assert res["average"] == pytest.approx(sum(res[t]["acc"] for t in tasks) / len(tasks))
    printed = capsys.readouterr().out
    assert "hellaswag" in printed and f"{res['average']:.4f}" in printed
    print(f"nine tasks on the tiny model: {elapsed:.1f} s")


def test_rigged_model_scores_one(model, tokenizer, tmp_path):
    """A model that prefers the gold answer gets acc = acc_norm = 1 on every task (checks the
    gold labels our task files and YAMLs produce, and the result extraction)."""
    names = list(ZEROSHOT_TASKS)
    local.write_local_tasks(names, DATA, tmp_path)
    task_objects = TaskManager(include_path=str(tmp_path), include_defaults=False).load(names)["tasks"]
    lm = GoldLM(task_objects, pretrained=model, tokenizer=tokenizer, batch_size=8)
    res = zeroshot.evaluate_lm(lm, quick_cfg())
    for task in names:
        assert res[task]["acc"] == 1.0, task
        assert res[task].get("acc_norm", 1.0) == 1.0, task
    assert res["lambada_openai"]["perplexity"] == pytest.approx(1.0)
    assert res["average"] == 1.0
    assert res["copa"]["samples"] == 4  # both cause and effect questions, gold from the label


def test_limit_and_parquet(model, tokenizer, tmp_path):
    """``limit`` caps docs per task; a parquet mirror is read like jsonl."""
    import datasets

    (tmp_path / "arc_easy").mkdir()
    records = datasets.load_dataset("json", data_files=str(DATA / "arc_easy" / "test.jsonl"), split="train")
    records.to_parquet(str(tmp_path / "arc_easy" / "test.parquet"))
    shutil.copytree(DATA / "rte", tmp_path / "rte")
    res = zeroshot.run_zeroshot(model, tokenizer, quick_cfg(tasks=["arc_easy", "rte"], limit=2,
                                                            local_dir=str(tmp_path)), "cpu")
    assert set(res) == {"arc_easy", "rte", "average", "average_metric"}
    assert res["arc_easy"]["samples"] == 2 and res["rte"]["samples"] == 2
    assert local.local_task_config(tmp_path, "arc_easy")["dataset_path"] == "parquet"


def test_overlay_splits_and_fewshot(tmp_path):
    """Only the splits present are declared; few-shot needs the split examples come from."""
    piqa = local.local_task_config(DATA, "piqa", num_fewshot=1)
    assert piqa["training_split"] == "train" and piqa["validation_split"] == "validation"
    assert piqa["test_split"] is None and piqa["dataset_path"] == "json"
    assert set(piqa["dataset_kwargs"]["data_files"]) == {"train", "validation"}
    obqa = local.local_task_config(DATA, "openbookqa")
    assert obqa["training_split"] is None and obqa["test_split"] == "test"
    with pytest.raises(FileNotFoundError, match="boolq/train.jsonl"):
        local.local_task_config(DATA, "boolq", num_fewshot=5)
    assert local.write_local_tasks(["piqa", "mmlu", "boolq"], DATA, tmp_path) == ["piqa", "boolq"]
    assert local.expected_file("/mirror", "arc_easy") == Path("/mirror/arc_easy/test.jsonl")
    assert local.expected_file("/mirror", "piqa") == Path("/mirror/piqa/validation.jsonl")


def _assert_fails_fast(model, tokenizer, cfg, expect):
    t0 = time.time()
    with pytest.raises(RuntimeError) as err:
        zeroshot.run_zeroshot(model, tokenizer, cfg, "cpu")
    assert time.time() - t0 < 60
    msg = str(err.value)
    assert "eval.zeroshot.local_dir" in msg and expect in msg, msg
    return msg


def test_missing_data_offline_flag_fails_fast(model, tokenizer, tmp_path):
    """HF offline flags, task not in the mirror nor the HF cache -> clear error < 60 s."""
    shutil.copytree(DATA / "rte", tmp_path / "rte")
    cfg = quick_cfg(tasks=["rte", "piqa"], local_dir=str(tmp_path))
    _assert_fails_fast(model, tokenizer, cfg, str(tmp_path / "piqa" / "validation.jsonl"))


def test_missing_data_unreachable_hub_fails_fast(model, tokenizer, monkeypatch):
    """No offline flag but the hub endpoint is unreachable -> clear error before lm-eval."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    assert "unreachable" in hub.offline_reason()
    msg = _assert_fails_fast(model, tokenizer, quick_cfg(tasks=["lambada_openai"], local_dir=None),
                             "<local_dir>/lambada_openai/test.jsonl")
    assert "HF_DATASETS_OFFLINE" in msg


def test_bad_config_errors(model, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.zeroshot.local_dir"):
        zeroshot.run_zeroshot(model, tokenizer, quick_cfg(local_dir=str(tmp_path / "nope")), "cpu")
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        zeroshot.run_zeroshot(model, tokenizer, quick_cfg(tasks=["rte", "no_such_task"]), "cpu")
    with pytest.raises(ValueError, match="bootstrap_iters"):
        ZeroShotConfig(bootstrap_iters=-1)
    with pytest.raises(ValueError, match="eval.zeroshot.average"):
        ZeroShotConfig(average="acc_norm")


def test_summary_flattens_lm_eval_output():
    """summarize(): ``metric,filter`` keys flattened, "N/A" stderrs dropped, the average over
    leaf tasks of acc (else the first higher-is-better metric)."""
    out = {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": 0.75, "acc_stderr,none": 0.1,
                     "acc_norm,none": 0.5, "acc_norm_stderr,none": 0.2},
            "lambada_openai": {"alias": "lambada_openai", "perplexity,none": 12.5,
                               "perplexity_stderr,none": "N/A", "acc,none": 0.25,
                               "acc_stderr,none": 0.05},
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.125,
                      "exact_match_stderr,strict-match": 0.01},
            "my_group": {"alias": "my_group", "acc,none": 0.9},
        },
        "groups": {"my_group": {}},
        "higher_is_better": {"gsm8k": {"exact_match": True}},
        "n-samples": {"piqa": {"original": 1838, "effective": 50}},
    }
    res = zeroshot.summarize(out)
    assert res["piqa"] == {"acc": 0.75, "acc_stderr": 0.1, "acc_norm": 0.5,
                           "acc_norm_stderr": 0.2, "samples": 50}
    assert res["lambada_openai"] == {"perplexity": 12.5, "acc": 0.25, "acc_stderr": 0.05}
    assert res["gsm8k"] == {"exact_match_strict-match": 0.125,
                            "exact_match_stderr_strict-match": 0.01}
    assert "my_group" not in res
    assert res["average"] == pytest.approx((0.75 + 0.25 + 0.125) / 3)
    assert res["average_metric"] == "acc"
    with pytest.raises(ValueError, match="accuracy-like"):
        zeroshot.summarize(out | {"higher_is_better": {}})
    # acc_norm where a task has it (piqa), acc elsewhere; both metrics stay in the rows
    norm = zeroshot.summarize(out, "acc_norm_if_any")
    assert norm["average"] == pytest.approx((0.5 + 0.25 + 0.125) / 3)
    assert norm["average_metric"] == "acc_norm_if_any" and norm["piqa"] == res["piqa"]
    with pytest.raises(ValueError, match="acc_norm_if_any"):
        zeroshot.summarize(out, "acc_norm")


def test_mirror_writes_the_layout_we_read(tmp_path, monkeypatch):
    """hbllm.tasks.mirror asks datasets for each built-in task's hub dataset and split and
    writes them where the overlay looks (the hub is replaced by our small files)."""
    import datasets

    from hbllm.tasks import mirror

    asked, real_load = [], datasets.load_dataset

    def fake_hub(path, name=None, split=None):
        asked.append((path, name, split))
        task = {"allenai/ai2_arc": "arc_easy", "baber/piqa": "piqa", "aps/super_glue": "copa"}[path]
        file = DATA / task / f"{split}.jsonl"
        return real_load("json", data_files=str(file), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    with pytest.raises(KeyError, match="no air-gapped template"):
        mirror.main([str(tmp_path), "piqa", "mmlu"])
    assert asked == []
    mirror.main([str(tmp_path), "arc_easy", "copa"])
    mirror.main([str(tmp_path), "piqa", "--fewshot"])
    assert asked == [("allenai/ai2_arc", "ARC-Easy", "test"), ("aps/super_glue", "copa", "validation"),
                     ("baber/piqa", None, "validation"), ("baber/piqa", None, "train")]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl")) == \
        ["arc_easy/test.jsonl", "copa/validation.jsonl", "piqa/train.jsonl", "piqa/validation.jsonl"]
    written = [json.loads(line) for line in open(tmp_path / "arc_easy" / "test.jsonl")]
    assert written == [json.loads(line) for line in open(DATA / "arc_easy" / "test.jsonl")]
    assert local.local_task_config(tmp_path, "piqa", num_fewshot=3)["training_split"] == "train"

"""Data protocol tests: GPTQ joining and windows, local layouts, fast failures, wiki_sample.

A small byte-level BPE tokenizer is trained on the fly (lossless decode, BOS like Gemma/LLaMA),
so no model download is needed.
"""
import gzip
import json
import random
import time

import pytest
import torch

import hbllm.data.sources as sources
from conftest import REPO
from hbllm import hub
from hbllm.config import CalibConfig, DataConfig
from hbllm.data import DataUnavailable, get_calibration, get_eval_tokens, wiki_sample

# Training text of the test tokenizer: the repository's own docs (in every clone), so the tests
# that need only synthetic files never depend on ../shared/data.
TOKENIZER_TEXT = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE (vocab 600) trained on the repo's docs; prepends <s> like GPTQ's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [line for p in TOKENIZER_TEXT for line in p.read_text().splitlines()]
    assert len(lines) > 200
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path_factory, monkeypatch):
    """``datasets`` writes its Arrow caches (and would look for hub copies) in a temp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                        tmp_path_factory.getbasetemp() / "hf_datasets")


def decode(tokenizer, ids):
    assert ids[0, 0] == tokenizer.bos_token_id
    return tokenizer.decode(ids[0, 1:].tolist(), clean_up_tokenization_spaces=False)


def gptq_wikitext_rows(path):
    """Rows as the hub's wikitext builder yields them: lines with "\\n", blank lines as ""."""
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def write_c4(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z",
                                "url": "https://example.com"}) + "\n")


# ------------------------------------------------------------------ evaluation streams
def test_wikitext2_eval_joins_rows_like_gptq(shared_data, tokenizer):
    ids = get_eval_tokens("wikitext2", DataConfig(local_dir=str(shared_data)), tokenizer)
    text = "\n\n".join(gptq_wikitext_rows(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert torch.equal(ids, tokenizer(text, return_tensors="pt").input_ids)
    assert decode(tokenizer, ids) == text
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is")


def test_wikitext2_blank_lines_become_empty_rows(tmp_path, tokenizer):
    d = tmp_path / "wikitext-2-raw"
    d.mkdir()
    (d / "wiki.test.raw").write_text(" \n = Title = \n \n Some text . \n\n Last line . \n")
    ids = get_eval_tokens("wikitext2", DataConfig(local_dir=str(tmp_path)), tokenizer)
    rows = ["", " = Title = \n", "", " Some text . \n", "", " Last line . \n"]
    assert decode(tokenizer, ids) == "\n\n".join(rows)


def test_wikitext2_files_directly_in_local_dir(tmp_path, tokenizer):
    (tmp_path / "wiki.test.raw").write_text(" a b c \n d e \n")
    ids = get_eval_tokens("wikitext2", DataConfig(local_dir=str(tmp_path)), tokenizer)
    assert decode(tokenizer, ids) == " a b c \n\n\n d e \n"


def test_ptb_eval_joins_stripped_sentences_with_space(shared_data, tokenizer):
    ids = get_eval_tokens("ptb", DataConfig(local_dir=str(shared_data)), tokenizer)
    lines = (shared_data / "ptb" / "ptb.test.txt").read_text().splitlines()
    assert decode(tokenizer, ids) == " ".join(s.strip() for s in lines)
    assert len(lines) == 3761


def test_c4_eval_first_1100_docs_cut_to_256_windows(tmp_path, tokenizer):
    docs = [f"document {i} says the market rose {i % 7} points ." for i in range(1200)]
    write_c4(tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz", docs)
    data = DataConfig(local_dir=str(tmp_path))
    full = tokenizer(" ".join(docs[:1100]), return_tensors="pt").input_ids
    seqlen = 16
    assert full.shape[1] > 256 * seqlen  # the cut is active
    ids = get_eval_tokens("c4", data, tokenizer, seqlen=seqlen)
    assert torch.equal(ids, full[:, :256 * seqlen])
    # a long window: all 1100 documents and nothing from document 1100 on
    ids = get_eval_tokens("c4", data, tokenizer, seqlen=10**6)
    text = decode(tokenizer, ids)
    assert text.endswith(docs[1099]) and "document 1100 " not in text
    assert get_eval_tokens("c4", data, tokenizer, max_tokens=100).shape == (1, 100)
    with pytest.raises(ValueError, match="seqlen"):
        get_eval_tokens("c4", data, tokenizer)


def test_text_files_eval(tmp_path, tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first file\nline two\n")
    b.write_text("second file")
    ids = get_eval_tokens("text_files", DataConfig(eval_files=[str(a), str(b)]), tokenizer)
    assert decode(tokenizer, ids) == "first file\nline two\n\n\nsecond file"
    with pytest.raises(DataUnavailable, match="nope.txt"):
        get_eval_tokens("text_files", DataConfig(eval_files=[str(tmp_path / "nope.txt")]),
                        tokenizer)


# ------------------------------------------------------------------ calibration windows
def test_calibration_windows_are_gptq_random_windows(tmp_path, tokenizer):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i}: the index rose {i % 13} points ." for i in range(400)))
    cfg = CalibConfig(name="text_files", nsamples=6, files=[str(text)])
    seqlen = 64
    calib = get_calibration(cfg, DataConfig(), tokenizer, seqlen, seed=3)
    assert calib.shape == (6, seqlen) and calib.dtype == torch.long
    stream = tokenizer(text.read_text(), return_tensors="pt").input_ids[0]
    random.seed(3)  # GPTQ: random.seed(seed); i = random.randint(0, n - seqlen - 1)
    starts = [random.randint(0, stream.numel() - seqlen - 1) for _ in range(6)]
    assert torch.equal(calib, torch.stack([stream[i:i + seqlen] for i in starts]))
    assert torch.equal(calib, get_calibration(cfg, DataConfig(), tokenizer, seqlen, seed=3))
    assert not torch.equal(calib, get_calibration(cfg, DataConfig(), tokenizer, seqlen, seed=4))


def test_calibration_too_short_text_is_reported(tmp_path, tokenizer):
    f = tmp_path / "short.txt"
    f.write_text("too short")
    cfg = CalibConfig(name="text_files", nsamples=2, files=[str(f)])
    with pytest.raises(DataUnavailable, match="seqlen=128"):
        get_calibration(cfg, DataConfig(), tokenizer, 128, seed=0)


def test_c4_calibration_windows_come_from_long_documents(tmp_path, tokenizer):
    rng = random.Random(0)
    words = "the a market stock rose fell points index trading shares".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.choice([3, 5, 200])))
            for _ in range(300)]
    write_c4(tmp_path / "c4" / "c4-train.00000-of-01024.json.gz", docs)
    data = DataConfig(local_dir=str(tmp_path))
    cfg = CalibConfig(name="c4", nsamples=8)
    seqlen = 32
    calib = get_calibration(cfg, data, tokenizer, seqlen, seed=0)
    assert calib.shape == (8, seqlen)
    assert torch.equal(calib, get_calibration(cfg, data, tokenizer, seqlen, seed=0))
    long_docs = [tokenizer(d).input_ids for d in docs if len(tokenizer(d).input_ids) > seqlen]
    for w in calib.tolist():
        assert any(any(ids[i:i + seqlen] == w for i in range(len(ids) - seqlen))
                   for ids in long_docs)


def test_c4_calibration_without_long_documents_fails_instead_of_looping(tmp_path, tokenizer):
    write_c4(tmp_path / "c4-train.00000-of-01024.json.gz", ["short one", "short two"])
    with pytest.raises(DataUnavailable, match="no c4 train document"):
        get_calibration(CalibConfig(name="c4", nsamples=1),
                        DataConfig(local_dir=str(tmp_path)), tokenizer, 64, seed=0)


# ------------------------------------------------------------------ failures are fast and clear
def test_missing_local_split_names_the_file(tmp_path, tokenizer):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Title = \n")  # test split only
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailable, match=r"wikitext-2-raw/wiki\.train\.raw"):
        get_calibration(CalibConfig(name="wikitext2"), DataConfig(local_dir=str(tmp_path)),
                        tokenizer, 128, seed=0)
    with pytest.raises(DataUnavailable, match=r"c4/c4-validation\.00000-of-00008\.json\.gz"):
        get_eval_tokens("c4", DataConfig(local_dir=str(tmp_path)), tokenizer, seqlen=128)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("how", ["offline_flag", "env_offline", "unreachable", "hanging"])
def test_hub_without_network_fails_fast(how, monkeypatch, tokenizer):
    """Never wait on network retries: offline settings or a dead/hanging hub -> quick error."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", how == "env_offline")
    if how == "unreachable":
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    if how == "hanging":
        class Hanging:
            def head(self, *args, **kwargs):
                time.sleep(30)

        monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.5)
        monkeypatch.setattr(huggingface_hub, "get_session", lambda: Hanging())
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailable, match="data.local_dir") as err:
        get_eval_tokens("wikitext2", DataConfig(offline=how == "offline_flag"), tokenizer)
    assert time.perf_counter() - t0 < 60
    expected = {"offline_flag": "data.offline", "env_offline": "HF_HUB_OFFLINE",
                "unreachable": "unreachable", "hanging": "did not answer"}[how]
    assert expected in str(err.value)
    assert datasets.config.HF_HUB_OFFLINE == (how == "env_offline")  # forced offline undone


def test_hub_path_requests_the_gptq_datasets(monkeypatch, tokenizer):
    """The hub code path (not reachable here) asks for the right ids and joins the right column."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, data_files=None, split=None):
        calls.append((path, name, data_files, split))
        column = "sentence" if path.startswith("ptb") else "text"
        return datasets.Dataset.from_dict({column: [" no it was n't ", "black monday "],
                                           "extra": [1, 2]})

    monkeypatch.setattr(hub, "offline_reason", lambda forced=None: None)
    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    ids = get_eval_tokens("ptb", DataConfig(), tokenizer)
    assert calls == [("ptb-text-only/ptb_text_only", "penn_treebank", None, "test")]
    assert decode(tokenizer, ids) == " no it was n't  black monday "
    rows = sources.load_split("c4", "validation", DataConfig())
    assert calls[-1] == ("allenai/c4", None,
                         {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation")
    assert rows.column_names == ["text"]


# ------------------------------------------------------------------ wiki_sample
def test_wiki_sample_split_by_article(tokenizer):
    calib, held_out = wiki_sample.split("calib"), wiki_sample.split("eval")
    assert calib and held_out
    titles_c, titles_e = {a["title"] for a in calib}, {a["title"] for a in held_out}
    assert not titles_c & titles_e
    assert len(titles_c) + len(titles_e) == len(wiki_sample.articles()) > 100
    for a in calib + held_out:
        assert a["text"].startswith(a["title"] + "\n\n")
        for markup in ("[[", "]]", "{{", "}}", "'''", "<ref", "|", "thumb|", "\n==", "\n* "):
            assert markup not in a["text"], (a["title"], markup)
    ids = get_eval_tokens("wiki_sample", DataConfig(), tokenizer)
    assert decode(tokenizer, ids) == "\n\n".join(a["text"] for a in held_out)
    cfg = CalibConfig(name="wiki_sample", nsamples=4)
    windows = get_calibration(cfg, DataConfig(), tokenizer, 256, seed=0)
    assert windows.shape == (4, 256)
    stream = tokenizer("\n\n".join(a["text"] for a in calib), return_tensors="pt").input_ids[0]
    for w in windows:
        starts = (stream[: -len(w) + 1] == w[0]).nonzero()[:, 0]
        assert any(torch.equal(stream[i:i + len(w)], w) for i in starts)


# (document, window start) of GPTQ's get_c4 for the documents below, seed 0, seqlen 32; on the
# way the loop draws and rejects the short documents [27, 12, 24, 12]
PINNED_C4_PICKS = [(28, 107), (1, 4), (16, 62), (29, 200), (26, 77)]


def test_c4_calibration_order_is_gptqs(tmp_path):
    """GPTQ's get_c4 with random.seed(seed): per sample, randint(0, docs - 1) until a document
    has more than seqlen tokens, then randint(0, tokens - seqlen - 1) as the window start. Byte
    tokens make every (document, start) readable from the window itself."""
    from hbllm.models import byte_tokenizer

    docs = [(f"<{j:02d}>" + "abcdefghijklmnopqrstuvwxyz" * 10)[: 12 if j % 3 == 0 else 40 + 7 * j]
            for j in range(30)]
    write_c4(tmp_path / "c4" / "c4-train.00000-of-01024.json.gz", docs)
    tok, seqlen = byte_tokenizer(), 32
    calib = get_calibration(CalibConfig(name="c4", nsamples=5), DataConfig(local_dir=str(tmp_path)),
                            tok, seqlen, seed=0)
    random.seed(0)  # an independent replay of GPTQ's loop
    picks = []
    for _ in range(5):
        while True:
            doc = random.randint(0, len(docs) - 1)
            if len(docs[doc].encode()) > seqlen:
                break
        picks.append((doc, random.randint(0, len(docs[doc].encode()) - seqlen - 1)))
    assert picks == PINNED_C4_PICKS  # known offsets: a change of Python's random would show here
    assert [tok.decode(w.tolist()) for w in calib] == [docs[d][s:s + seqlen] for d, s in picks]

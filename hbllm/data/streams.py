"""Token streams for calibration and perplexity, following the GPTQ data protocol.

Calibration (``get_calibration``): ``nsamples`` windows of ``seqlen`` tokens drawn with
``random.Random(seed)`` exactly as GPTQ's ``random.seed(seed); random.randint(...)`` does:
c4 picks random train documents until one is longer than ``seqlen`` tokens and takes a random
window in it; the other sets join their calibration text into one stream and take random windows.
Evaluation (``get_eval_tokens``): one stream ``(1, ntokens)``: wikitext2 test rows joined with
"\\n\\n", ptb test sentences joined with " ", the first 1100 c4 validation documents joined with
" " and cut to ``256 * seqlen`` tokens. The tokenizer is called as GPTQ calls it
(``tokenizer(text, return_tensors="pt")``, special tokens included, so streams start with BOS).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import wiki_sample
from .sources import DataUnavailable, check_text_file, load_split

log = logging.getLogger(__name__)

C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256
JOIN = {"wikitext2": "\n\n", "ptb": " ", "c4": " ", "wiki_sample": "\n\n", "text_files": "\n\n"}


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """``text`` as one token stream, shape (1, ntokens), int64 (no length warning)."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids.long()


def read_text_files(files: list[str], what: str) -> list[str]:
    """Whole contents of ``files`` (one string per file), read with ``datasets``' text loader."""
    import datasets

    missing = [f for f in files if not Path(f).expanduser().is_file()]
    if missing:
        raise DataUnavailable(f"{what}: file(s) not found: {missing}")
    paths = [str(Path(f).expanduser()) for f in files]
    for path in paths:
        check_text_file(Path(path), what)
    ds = datasets.load_dataset("text", data_files={"files": paths}, split="files",
                               sample_by="document", keep_linebreaks=True)
    return ds["text"]


def eval_text(name: str, data) -> str:
    """The evaluation text of ``name`` (before tokenization and the c4 cut)."""
    if name in ("wikitext2", "ptb"):
        return JOIN[name].join(load_split(name, "test", data)["text"])
    if name == "c4":
        val = load_split("c4", "validation", data)
        if len(val) < C4_EVAL_DOCS:
            log.warning("c4 validation has %d documents, fewer than the %d of the protocol",
                        len(val), C4_EVAL_DOCS)
        return JOIN[name].join(val.select(range(min(C4_EVAL_DOCS, len(val))))["text"])
    if name == "wiki_sample":
        return JOIN[name].join(a["text"] for a in wiki_sample.split("eval"))
    if name == "text_files":
        if not data.eval_files:
            raise ValueError("eval dataset text_files needs data.eval_files=[path, ...]")
        return JOIN[name].join(read_text_files(list(data.eval_files), "data.eval_files"))
    raise ValueError(f"unknown evaluation dataset {name!r}")


def get_eval_tokens(name: str, data, tokenizer, seqlen: int | None = None,
                    max_tokens: int | None = None) -> torch.Tensor:
    """Evaluation stream of ``name``, a LongTensor (1, ntokens).

    seqlen: evaluation window length; c4 is cut to ``256 * seqlen`` tokens (required for c4
    unless ``max_tokens`` is given). max_tokens: cut any stream to at most this many tokens.
    """
    if name == "c4" and seqlen is None and max_tokens is None:
        raise ValueError("c4 evaluation is cut to 256*seqlen tokens: pass seqlen= "
                         "(the evaluation window length) or max_tokens=")
    ids = tokenize(tokenizer, eval_text(name, data))
    cuts = [] if max_tokens is None else [max_tokens]
    if name == "c4" and seqlen is not None:
        cuts.append(C4_EVAL_WINDOWS * seqlen)
    if cuts:
        ids = ids[:, :min(cuts)]
    log.info("eval %s: %d tokens", name, ids.shape[1])
    return ids


def calib_text(cfg, data) -> str:
    """The calibration text of ``cfg.name`` as one string (not used for c4)."""
    name = cfg.name
    if name in ("wikitext2", "ptb"):
        return JOIN[name].join(load_split(name, "train", data)["text"])
    if name == "wiki_sample":
        return JOIN[name].join(a["text"] for a in wiki_sample.split("calib"))
    if name == "text_files":
        return JOIN[name].join(read_text_files(list(cfg.files), "calib.files"))
    raise ValueError(f"unknown calibration dataset {name!r}")


def get_calibration(cfg, data, tokenizer, seqlen: int, seed: int) -> torch.Tensor:
    """``cfg.nsamples`` random windows, a LongTensor (nsamples, seqlen); same seed, same windows."""
    if seqlen <= 0 or cfg.nsamples <= 0:
        raise ValueError(f"seqlen={seqlen} and calib.nsamples={cfg.nsamples} must be positive")
    rng = random.Random(seed)
    if cfg.name == "c4":
        windows = _c4_windows(load_split("c4", "train", data), tokenizer, cfg.nsamples, seqlen,
                              rng)
    else:
        ids = tokenize(tokenizer, calib_text(cfg, data))[0]
        if ids.numel() <= seqlen:
            raise DataUnavailable(f"calibration set {cfg.name} has {ids.numel()} tokens, not "
                                  f"more than seqlen={seqlen}")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(cfg.nsamples)]
        windows = [ids[i:i + seqlen] for i in starts]
    log.info("calibration %s: %d windows of %d tokens (seed %d)", cfg.name, len(windows),
             seqlen, seed)
    return torch.stack(windows)


def _c4_windows(train, tokenizer, nsamples: int, seqlen: int, rng: random.Random):
    """GPTQ's get_c4: per sample, random documents until one has > seqlen tokens, then a window."""
    too_short = set()
    windows = []
    for _ in tqdm(range(nsamples), desc="c4 calibration", leave=False):
        while True:
            doc = rng.randint(0, len(train) - 1)
            ids = tokenize(tokenizer, train[doc]["text"])[0]
            if ids.numel() > seqlen:
                break
            too_short.add(doc)
            if len(too_short) == len(train):
                raise DataUnavailable(f"no c4 train document has more than seqlen={seqlen} "
                                      "tokens")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return windows

"""Calibration and evaluation data (GPTQ protocol) from the hub, local files or offline corpora.

>>> calib = get_calibration(cfg.calib, cfg.data, tokenizer, seqlen=2048, seed=0)  # (128, 2048)
>>> test = get_eval_tokens("wikitext2", cfg.data, tokenizer, seqlen=2048)         # (1, ntokens)

Datasets: wikitext2, ptb, c4 (hub, or ``data.local_dir`` laid out as in docs/data.md),
wiki_sample (gensim's Wikipedia sample, offline), text_files (your own files).
A dataset that cannot be had raises :class:`DataUnavailable` quickly, saying what to do.
"""
from .sources import DataUnavailable
from .streams import get_calibration, get_eval_tokens

__all__ = ["DataUnavailable", "get_calibration", "get_eval_tokens"]

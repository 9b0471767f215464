"""Published numbers as data (``published.csv`` beside this file) and their match to our runs.

``published.csv`` holds one row per number a paper prints, with its source::

    paper, source, model, method, dataset, metric, bits, value, note

``source``: arXiv id and table ("arXiv:2512.00862 Table 1"); ``model``: a ``hbllm/conf/model`` name;
``method``: our method label (``QuantConfig.label``: fp16, billm, hbllm_row, ...; methods we do
not have yet keep the name their preset will get: gptq, pbllm, arbllm_x, arbllm_rc);
``dataset``: wikitext2 | c4 | ptb (``metric`` ppl), a zero-shot task, or ``avgqa`` (the mean
over the HBLLM paper's nine tasks); ``bits``: as the paper claims them (its own accounting).

A run is compared with a published number when model and method are the same (the fp16 rows
also against a quantized run's ``baseline_*`` results) and the run followed the papers'
protocol (:func:`protocol_matches`).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PUBLISHED_CSV = Path(__file__).with_name("published.csv")
COLUMNS = ("paper", "source", "model", "method", "dataset", "metric", "bits", "value", "note")
PPL_DATASETS = ("wikitext2", "c4", "ptb")
# the protocol of the HBLLM and BiLLM papers (GPTQ's): C4 calibration, 128 x 2048 tokens,
# perplexity over whole test sets in 2048-token windows, zero-shot with 0 shots on whole tasks
PAPER_PROTOCOL = {"calib": "c4", "nsamples": 128, "seqlen": 2048}


@dataclass(frozen=True)
class Published:
    """One published number (a row of published.csv)."""

    paper: str
    source: str
    model: str
    method: str
    dataset: str
    metric: str
    bits: float | None
    value: float
    note: str = ""

    @property
    def key(self) -> str:
        """The report column this number sits beside: ppl_<dataset>, zeroshot_avg or
        zs_<task>_<metric>."""
        if self.metric == "ppl":
            return f"ppl_{self.dataset}"
        return "zeroshot_avg" if self.dataset == "avgqa" else f"zs_{self.dataset}_{self.metric}"


def load(path: Path | str = PUBLISHED_CSV) -> list[Published]:
    """The rows of a published-numbers CSV, in file order (checked: every row has a source)."""
    return list(_load(str(path)))


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[Published, ...]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(COLUMNS)}")
        for i, r in enumerate(reader, start=2):
            if not (r["source"].startswith("arXiv:") and r["model"] and r["method"] and r["value"]):
                raise ValueError(f"{path} line {i}: needs source (arXiv:<id> ...), model, method "
                                 "and value")
            rows.append(Published(r["paper"], r["source"], r["model"], r["method"], r["dataset"],
                                  r["metric"], float(r["bits"]) if r["bits"] else None,
                                  float(r["value"]), r["note"]))
    return tuple(rows)


def protocol_matches(config: dict) -> bool:
    """Whether a run's resolved config (results.json ``config``) follows the papers' protocol:
    calibration on C4, 128 sequences of 2048 tokens; perplexity windows of 2048 tokens over the
    whole test sets, no BOS; zero-shot 0-shot on whole tasks."""
    model, calib = config.get("model") or {}, config.get("calib") or {}
    ev = config.get("eval") or {}
    zs = ev.get("zeroshot") or {}
    seqlen = model.get("seqlen")
    return (calib.get("name") == PAPER_PROTOCOL["calib"]
            and calib.get("nsamples") == PAPER_PROTOCOL["nsamples"]
            and (calib.get("seqlen") or seqlen) == PAPER_PROTOCOL["seqlen"]
            and (ev.get("seqlen") or seqlen) == PAPER_PROTOCOL["seqlen"]
            and ev.get("max_windows") is None and not ev.get("bos")
            and zs.get("limit") is None and not zs.get("num_fewshot"))


def our_value(results: dict, row: Published) -> float | None:
    """The run's number for ``row`` (None when it did not measure it). fp16 rows read a
    quantized run's ``baseline_*`` results; ``avgqa`` needs all nine paper tasks averaged with
    the row's metric."""
    from hbllm.config import ZEROSHOT_TASKS

    if row.method == results.get("method"):
        prefix = ""
    elif row.method == "fp16":
        prefix = "baseline_"
    else:
        return None
    if row.metric == "ppl":
        return (results.get(f"{prefix}ppl") or {}).get(row.dataset)
    zs = results.get(f"{prefix}zeroshot") or {}
    if row.dataset == "avgqa":
        tasks = {t for t, r in zs.items() if isinstance(r, dict)}
        same = tasks == set(ZEROSHOT_TASKS) and zs.get("average_metric", "acc") == row.metric
        return zs.get("average") if same else None
    return (zs.get(row.dataset) or {}).get(row.metric)


def matching(results: dict, rows: list[Published] | None = None
             ) -> list[tuple[Published, float | None]]:
    """``(published, ours)`` for every published number of the run's model and method (and
    fp16), when the run followed the papers' protocol; ``ours`` is None where not measured."""
    rows = load() if rows is None else rows
    if not protocol_matches(results.get("config") or {}):
        return []
    methods = {results.get("method"), "fp16"}
    return [(row, our_value(results, row)) for row in rows
            if row.model == results.get("model") and row.method in methods]


def report_columns(results: dict, rows: list[Published] | None = None) -> dict[str, float]:
    """``pub_<key>`` (the published number) and ``ratio_<key>`` (ours / published) for the
    run's own method; where several papers print one number, the first row of the CSV wins."""
    out: dict[str, float] = {}
    for row, ours in matching(results, rows):
        if row.method != results.get("method") or f"pub_{row.key}" in out:
            continue
        out[f"pub_{row.key}"] = row.value
        if ours is not None:
            out[f"ratio_{row.key}"] = ours / row.value
    return out


def format_published(results: dict, rows: list[Published] | None = None) -> str:
    """Lines printed under a finished run's table: each matching published number, ours and
    the ratio ("" when none matches)."""
    lines = []
    for row, ours in matching(results, rows):
        what = f"{row.dataset} {row.metric}"
        mine = "" if ours is None else f"   ours {ours:<8.4g} ratio {ours / row.value:.3f}"
        bits = f", {row.bits:g} bits" if row.bits is not None else ""
        lines.append(f"  {row.method:<10} {what:<18} {row.value:<8g}{mine}   "
                     f"({row.paper}, {row.source}{bits})")
    if not lines:
        return ""
    return "published (same model, method and protocol):\n" + "\n".join(lines)

"""hbllm-report's view of repeated runs: runs of one sweep that differ only by ``seed`` or
``repeat`` form a group; a group is one row (n, geometric mean, spread, min-max of each
perplexity) and every two groups are compared with :func:`hbllm.stats.compare`.

Used by :func:`hbllm.report.build_report`; the statistics are in :mod:`hbllm.stats`.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .stats import REPEAT_KEYS, Summary, compare, group_key, summarize


def split_keys(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """Swept keys -> (config keys, repeat keys ``seed``/``repeat``)."""
    return [k for k in keys if k not in REPEAT_KEYS], [k for k in keys if k in REPEAT_KEYS]


def group_runs(runs: Sequence, keys: Sequence[str], values) -> list[list[int]]:
    """Indices of ``runs`` grouped by config identity without seed/repeat, method label and the
    values of the non-repeat swept ``keys`` (``values(run, key)``), in order of first
    appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        ident = (group_key(run.results.get("config") or {}), run.results.get("method"),
                 tuple(str(values(run, k)) for k in keys))
        groups.setdefault(ident, []).append(i)
    return list(groups.values())


def _ppl_columns(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("ppl_") or c.startswith("baseline_ppl_"))


def group_rows(df: pd.DataFrame, groups: Sequence[Sequence[int]], keys: Sequence[str]
               ) -> tuple[pd.DataFrame, list[dict[str, list[float]]]]:
    """One row per group of the per-run table ``df``: the swept ``keys`` and method, ``n``,
    the mean of every other number, and per perplexity column its geometric mean (the column
    itself), ``gstd_<col>``, ``min_<col>``, ``max_<col>``. Also returns each group's raw
    perplexities ``{col: [values]}`` for :func:`comparisons`."""
    ppl_cols = _ppl_columns(df)
    rows, raw = [], []
    for idx in groups:
        g = df.iloc[list(idx)]
        row: dict[str, object] = {k: g.iloc[0][k] for k in [*keys, "method"] if k in g}
        row["n"] = len(g)
        for col in g.columns:
            if col in row or col in ppl_cols or not pd.api.types.is_numeric_dtype(g[col]):
                continue
            if g[col].notna().any():
                row[col] = float(g[col].mean())
        vals = {}
        for col in ppl_cols:
            s = summarize(list(g[col].dropna()), log=True)
            if s is None:
                continue
            vals[col] = list(g[col].dropna())
            row[col], row[f"gstd_{col}"], row[f"min_{col}"], row[f"max_{col}"] = \
                s.mean, s.std, s.min, s.max
        rows.append(row)
        raw.append(vals)
    return pd.DataFrame(rows), raw


def summary_cell(row: pd.Series, col: str) -> str:
    """A grouped perplexity cell: ``226.3 (x/1.12, 198.1-268.7)``; ``-`` when absent."""
    if col not in row or pd.isna(row[col]):
        return "-"
    s = Summary(int(row["n"]), row[col], row[f"gstd_{col}"], row[f"min_{col}"],
                row[f"max_{col}"], log=True)
    return s.format()


def grouped_table(gdf: pd.DataFrame, cols: Sequence[str], fmt) -> str:
    """Markdown table of grouped rows; perplexity columns as summaries, others via ``fmt``."""
    from .report import _header

    head = "| " + " | ".join(_header(c) for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for _, row in gdf.iterrows():
        cells = [summary_cell(row, c) if c in _ppl_columns(gdf)
                 else (str(int(row[c])) if c == "n" else fmt(c, row.get(c))) for c in cols]
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def _label(row: pd.Series, keys: Sequence[str]) -> str:
    vals = [f"{k}={row[k]}" for k in keys if k in row and pd.notna(row[k]) and row[k] != row["method"]]
    return " ".join([str(row["method"]), *vals])


def comparisons(gdf: pd.DataFrame, raw: Sequence[dict[str, list[float]]], keys: Sequence[str],
                test: str = "welch") -> pd.DataFrame:
    """Every pair of groups (a before b in table order), per perplexity column: the ratio of
    geometric means b / a, the ``test``'s p-value and the verdict (hbllm.stats.compare)."""
    rows = []
    unique = gdf["method"].nunique() == len(gdf)  # the method alone names each config
    labels = [str(r["method"]) if unique else _label(r, keys) for _, r in gdf.iterrows()]
    for i in range(len(gdf)):
        for j in range(i + 1, len(gdf)):
            for col in raw[i]:
                if col not in raw[j] or col.startswith("baseline_"):
                    continue
                c = compare(raw[i][col], raw[j][col], test=test)
                rows.append({"a": labels[i], "b": labels[j], "metric": col, "n_a": c.n_a,
                             "n_b": c.n_b, "ratio_b_over_a": c.ratio, "p": c.p,
                             "test": test, "verdict": c.verdict, "cell": c.format()})
    return pd.DataFrame(rows)


def comparison_table(cmp: pd.DataFrame) -> str:
    """Markdown: one row per pair of configs, one column per perplexity dataset."""
    if cmp.empty:
        return ""
    metrics = list(dict.fromkeys(cmp["metric"]))
    head = ("| a | b | " + " | ".join(f"{m[4:]}: b/a" for m in metrics) + " |\n|"
            + "---|" * (2 + len(metrics)) + "\n")
    body = ""
    for (a, b), g in cmp.groupby(["a", "b"], sort=False):
        cells = {r["metric"]: r["cell"] for _, r in g.iterrows()}
        body += f"| {a} | {b} | " + " | ".join(cells.get(m, "-") for m in metrics) + " |\n"
    return head + body

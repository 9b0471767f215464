"""The accuracy-vs-bits frontier over every run given to ``hbllm-report`` (all sweeps together):
perplexity against full bits and against paper bits, one line per method family (``quant.method``,
through the family's own best runs), the overall Pareto front marked; ``frontier.csv`` lists every
point with its family and whether it is on the front; ``report.md`` gets, per model and dataset, the
front's points in order of full bits (which method is best at each stored-bits budget)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

BITS = {"bits_full": "full bits per weight (what a checkpoint stores)",
        "bits_paper": "bits per weight (each paper's convention)"}


def family(results: dict) -> str:
    """The method family of a run: its ``quant.method`` (``none`` -> fp16)."""
    method = ((results.get("config") or {}).get("quant") or {}).get("method")
    return "fp16" if method == "none" else str(method or results.get("method"))


def pareto(bits: Sequence[float], ppl: Sequence[float]) -> list[bool]:
    """Whether each point is on the lower-left Pareto front: no other point has bits and
    perplexity both at most its own and one of them lower."""
    pts = list(zip(bits, ppl))
    return [not any(b2 <= b and p2 <= p and (b2, p2) != (b, p) for b2, p2 in pts) for b, p in pts]


def frontier_table(df: pd.DataFrame, full_precision_bits: float) -> pd.DataFrame:
    """The quantized runs of ``df`` (report rows with a ``family`` column) with ``on_front_<bits>_<ds>``
    flags per bits convention and perplexity column."""
    q = df[df["bits_paper"] < full_precision_bits].copy()
    for ds in [c for c in q.columns if c.startswith("ppl_")]:
        for bits in BITS:
            flag = f"front_{bits[5:]}_{ds[4:]}"
            q[flag] = False
            for _, g in q[q[ds].notna()].groupby("model"):
                q.loc[g.index, flag] = pareto(list(g[bits]), list(g[ds]))
    return q


def plot_frontier(q: pd.DataFrame, refs: pd.DataFrame, ds: str, path: Path) -> None:
    """Perplexity (log) against full bits and paper bits: every run a marker, one line per family
    through its own best runs (its Pareto front), the overall front circled. Runs above 100x the
    full-precision perplexity are drawn as triangles at the top edge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = q[q[ds].notna()]
    ref = refs[ds].dropna()
    top = 100 * float(ref.min()) if len(ref) else float("inf")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (bits, title) in zip(axes, BITS.items()):
        for fam, g in pts.groupby("family", sort=True):
            y = g[ds].clip(upper=top)
            off = g[ds] > top
            best = g[pareto(list(g[bits]), list(g[ds]))].sort_values(bits)
            line, = ax.plot(best[bits], best[ds].clip(upper=top), label=fam)
            ax.scatter(g[bits][~off], y[~off], color=line.get_color(), s=18)
            ax.scatter(g[bits][off], y[off], color=line.get_color(), marker="^", s=30)
            for (_, row), yy in zip(g.iterrows(), y):
                ax.annotate(str(row["method"]), (row[bits], yy), fontsize=6, textcoords="offset points",
                            xytext=(3, 3), color=line.get_color())
        front = pts[pts[f"front_{bits[5:]}_{ds[4:]}"]]
        ax.scatter(front[bits], front[ds].clip(upper=top), s=120, facecolors="none", edgecolors="black",
                   label="Pareto front")
        for value in ref:
            ax.axhline(value, color="gray", linestyle="--", label="full precision")
        ax.set_yscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel(f"perplexity ({ds[4:]})" + (f"; triangles: > {top:.3g}" if (pts[ds] > top).any() else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier_section(df: pd.DataFrame, out: Path, full_precision_bits: float) -> list[str]:
    """Write ``frontier.csv`` and ``frontier_<model>_<ds>.png`` into ``out`` from the finished
    runs ``df`` (report rows plus ``family``); return the report.md lines."""
    q = frontier_table(df, full_precision_bits)
    if q.empty or q["family"].nunique() < 2:
        return []
    q.to_csv(out / "frontier.csv", index=False)
    refs = df[df["bits_paper"] >= full_precision_bits]
    md = ["## Accuracy-vs-bits frontier (all runs)", "",
          "One line per method family; circled: the Pareto front (no run has both fewer bits and "
          "a lower perplexity). Every point: `frontier.csv`.", ""]
    for model, g in q.groupby("model"):
        for ds in sorted(c for c in g.columns if c.startswith("ppl_") and g[c].notna().any()):
            name = f"frontier_{model}_{ds[4:]}.png".replace("/", "_")
            plot_frontier(g, refs[refs["model"] == model], ds, out / name)
            front = g[g[f"front_full_{ds[4:]}"]].sort_values("bits_full")
            md += [f"### {model}, {ds[4:]}: the front at full bits", "",
                   "| full bits | method | family | paper bits | perplexity |", "|---|---|---|---|---|"]
            md += [f"| {r.bits_full:.3f} | {r.method} | {r.family} | {r.bits_paper:.3f} | {r[ds]:.4g} |"
                   for _, r in front.iterrows()]
            md += ["", f"![frontier]({name})", ""]
    return md

"""``hbllm-report DIR...``: ablation tables, a CSV and plots from finished runs and sweeps.

Every ``results.json`` under the given run or multirun directories is one run (and, with
``--wandb DIR``, every offline W&B run under DIR that carries a ``files/results.json``). Runs
are grouped by sweep: the nearest directory holding Hydra's ``multirun.yaml``, else the DIR
they were found under (a W&B run: its ``logger.group``). Within a sweep, the swept parameters
are the overrides of ``.hydra/overrides.yaml`` whose value differs between runs (W&B runs: the
differing config values). Written to ``--out`` (default: the first DIR):

* ``report.md``: per sweep, one table per swept parameter (its values, bits per weight and
  perplexity per dataset, zero-shot average when measured), failed or unfinished runs listed;
* ``report.csv``: one row per run, full precision, the numbers of its results.json;
* ``<sweep>_ppl_vs_bits.png`` (perplexity vs paper bits per weight, one marker per method) and
  ``<sweep>_layer_loss.png`` (quantization loss per layer, one curve per run);
* over all runs, the accuracy-vs-bits frontier (:mod:`hbllm.frontier`): ``frontier.csv`` and
  ``frontier_<model>_<dataset>.png`` (perplexity vs full and paper bits, one line per method
  family, Pareto front marked).


Runs of a sweep that differ only by ``seed``/``repeat`` are repeats of one config
(:mod:`hbllm.report_noise`): the tables then have one row per config (n, geometric mean, spread,
range), every two configs are compared by a test over the repeats (``--test``; significant or
within noise), the plot has error bars, and ``report_groups.csv`` / ``report_comparisons.csv``
are written. ``--log-wandb`` logs the tables to W&B. See docs/sweeps.md, "Noise".
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from hbllm.reference import report_columns

from .frontier import family, frontier_section
from .report_noise import comparison_table, comparisons, group_rows, group_runs, grouped_table, split_keys
from .results import EXPERIMENT_PARTS, experiment_id, is_done
from .stats import ALPHA, TESTS

TEST_NAMES = {"welch": "two-sided Welch t-test", "mannwhitney": "two-sided Mann-Whitney U test"}

RESULTS = "results.json"
# runs at or above this many bits per weight are unquantized: drawn as reference lines
FULL_PRECISION_BITS = 8.0


@dataclass
class Run:
    """One run: its directory, the sweep it belongs to, its results.json and its overrides."""

    path: Path
    sweep: str
    results: dict
    overrides: dict[str, str] = field(default_factory=dict)
    num: int = 0  # position in its sweep (hydra.job.num)

    @property
    def status(self) -> str:
        return str(self.results.get("status", "unknown"))


def _parse_overrides(path: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` (a list of Hydra override strings) -> {key: value}."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if not path.exists():
        return {}
    lines = [str(x) for x in OmegaConf.to_container(OmegaConf.load(path))]
    parsed = OverridesParser.create().parse_overrides(lines)
    return {o.get_key_element(): o.get_value_element_as_str() for o in parsed if not o.is_delete()}


def _job_num(path: Path) -> int:
    """``hydra.job.num`` from a run's .hydra/hydra.yaml (0 when absent)."""
    from omegaconf import OmegaConf

    if not path.exists():
        return 0
    num = OmegaConf.select(OmegaConf.load(path), "hydra.job.num", default=0)
    return int(num) if isinstance(num, int) else 0


def _sweep_dir(run_dir: Path, root: Path) -> Path:
    """Nearest ancestor (up to ``root``) holding Hydra's multirun.yaml; else ``root`` itself."""
    for d in [run_dir, *run_dir.parents]:
        if (d / "multirun.yaml").exists():
            return d
        if d == root:
            break
    return root


def _sweep_name(sweep_dir: Path) -> str:
    return "/".join(sweep_dir.absolute().parts[-2:])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise SystemExit(f"{path} is not valid JSON ({err}); is the run still writing it?") from err


def find_runs(dirs: Sequence[Path], wandb_dirs: Sequence[Path] = ()) -> list[Run]:
    """Every run under ``dirs`` (Hydra run/multirun dirs) and ``wandb_dirs`` (offline W&B runs)."""
    runs: list[Run] = []
    for root in map(Path, dirs):
        if not root.is_dir():
            raise SystemExit(f"{root}: no such directory")
        for res in sorted(root.rglob(RESULTS)):
            if "wandb" in res.relative_to(root).parts:
                continue  # W&B's copy of a run's results; read with --wandb
            run_dir = res.parent
            runs.append(Run(run_dir, _sweep_name(_sweep_dir(run_dir, root)), _read_json(res),
                            _parse_overrides(run_dir / ".hydra" / "overrides.yaml"),
                            _job_num(run_dir / ".hydra" / "hydra.yaml")))
    for root in map(Path, wandb_dirs):
        if not root.is_dir():
            raise SystemExit(f"{root}: no such directory")
        latest: dict[str, Run] = {}  # a resumed run has one W&B run per attempt: keep the last
        for res in sorted(root.rglob(f"files/{RESULTS}")):  # offline-run-<date>_<time>-...: in order
            results = _read_json(res)
            group = (results.get("config") or {}).get("logger", {}).get("group") or "wandb"
            ident = experiment_id(results["config"]) if results.get("config") else str(res)
            latest[ident] = Run(res.parent.parent, f"wandb:{group}", results)
        runs.extend(latest.values())
    return runs


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Parameters whose value differs between the runs (overrides; else the resolved config's
    :data:`~hbllm.results.EXPERIMENT_PARTS`)."""
    if any(r.overrides for r in runs):
        values = [r.overrides for r in runs]
    else:
        values = [{k: v for k, v in _flatten(r.results.get("config") or {}).items()
                   if k.split(".")[0] in EXPERIMENT_PARTS} for r in runs]
    keys = sorted({k for v in values for k in v})
    return [k for k in keys if len({str(v.get(k)) for v in values}) > 1]


def run_row(run: Run) -> dict[str, object]:
    """One flat CSV row: identification, overrides, then the numbers of results.json as-is."""
    r = run.results
    row: dict[str, object] = {"sweep": run.sweep, "run_dir": str(run.path), "status": run.status,
                              "model": r.get("model"), "method": r.get("method"),
                              "family": family(r)}
    row.update(run.overrides)
    bits = r.get("bits") or {}
    row["bits_paper"], row["bits_full"] = bits.get("paper"), bits.get("full")
    for ds, v in (r.get("ppl") or {}).items():
        row[f"ppl_{ds}"] = v
    for ds, v in (r.get("baseline_ppl") or {}).items():
        row[f"baseline_ppl_{ds}"] = v
    zs = r.get("zeroshot") or {}
    if "average" in zs:
        row["zeroshot_avg"] = zs["average"]
    for task, m in zs.items():
        if isinstance(m, dict) and "acc" in m:
            row[f"zs_{task}_acc"] = m["acc"]
    row.update(report_columns(r))  # pub_<metric>, ratio_<metric>: the paper's number, ours/it
    for k, v in (r.get("timing") or {}).items():
        row[k] = v
    if r.get("error"):
        row["error"] = str(r["error"])
    return row


def _order(values: Sequence[object], nums: Sequence[int]) -> list[int]:
    """Row order: by value when all values are numbers, else in the sweep's job order."""
    try:
        keys = [float(str(v)) for v in values]
    except ValueError:
        keys = list(nums)
    return sorted(range(len(values)), key=lambda i: (keys[i], nums[i]))


def _fmt(col: str, v: object) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "-"
    if isinstance(v, float):
        if col.startswith(("bits", "ratio_")):
            return f"{v:.3f}"
        if col.startswith("zs") or col.endswith("zeroshot_avg") or col.startswith("pub_zs"):
            return f"{v:.4f}"
        return f"{v:.2f}"
    return str(v)


def _header(col: str) -> str:
    for prefix, title in (("pub_", "published "), ("ratio_", "ours/published ")):
        if col.startswith(prefix):
            return title + _header(col[len(prefix):])
    for prefix, title in (("baseline_ppl_", "fp16 ppl "), ("ppl_", "ppl "), ("bits_", "bits ")):
        if col.startswith(prefix):
            return title + col[len(prefix):]
    return {"zeroshot_avg": "zero-shot avg acc", "quantize_s": "quantize s"}.get(col, col)


def _md_table(df: pd.DataFrame) -> str:
    head = ("| " + " | ".join(map(_header, df.columns)) + " |\n|" + "---|" * len(df.columns)
            + "\n")
    body = "".join("| " + " | ".join(_fmt(c, row[c]) for c in df.columns) + " |\n"
                   for _, row in df.iterrows())
    return head + body


def _metric_columns(df: pd.DataFrame) -> list[str]:
    ppl = sorted(c for c in df.columns if c.startswith("ppl_"))
    base = sorted(c for c in df.columns if c.startswith("baseline_ppl_"))
    extra = [c for c in ("zeroshot_avg", "quantize_s") if c in df.columns]
    published = [f"{p}{c}" for c in [*ppl, "zeroshot_avg"] for p in ("pub_", "ratio_")
                 if f"{p}{c}" in df.columns]  # hbllm/reference: same model, method, protocol
    return ["bits_paper", "bits_full", *ppl, *base, *extra, *published]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "runs"


def _label(row: pd.Series, keys: Sequence[str]) -> str:
    vals = [f"{k.split('.')[-1]}={row[k]}" for k in keys
            if k in row and pd.notna(row[k]) and row[k] != row["method"]]
    return f"{row['method']}" + (f" ({', '.join(vals)})" if vals else "")


def plot_ppl_vs_bits(df: pd.DataFrame, keys: Sequence[str], path: Path) -> bool:
    """Perplexity (log) vs paper bits per weight, a subplot per eval dataset; error bars from
    ``min_<col>``/``max_<col>`` when ``df`` has grouped repeats. False: no data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(c for c in df.columns if c.startswith("ppl_") and df[c].notna().any())
    if not datasets:
        return False
    full = df[df["bits_paper"].isna() | (df["bits_paper"] >= FULL_PRECISION_BITS)]
    df = df[df["bits_paper"] < FULL_PRECISION_BITS]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for method, g in df[df[ds].notna()].groupby("method", sort=True):
            g = g.sort_values("bits_paper")
            ax.errorbar(g["bits_paper"], g[ds], yerr=_error_bars(g, ds), marker="o", capsize=3,
                        linestyle="-" if len(g) > 1 else "", label=str(method))
            for _, row in g.iterrows():
                vals = [str(row[k]) for k in keys if k in row and pd.notna(row[k])]
                if vals:
                    ax.annotate(",".join(vals), (row["bits_paper"], row[ds]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        refs = {f"{m} (full precision)": v for m, v in zip(full["method"], full[ds])}
        baselines = df[f"baseline_{ds}"].dropna() if f"baseline_{ds}" in df.columns else ()
        if not refs and len(baselines):  # the runs' own fp16 measurements: drawn once (the last)
            refs["fp16 baseline"] = baselines.iloc[-1]
        for (label, value), style in zip(refs.items(), ("--", ":", "-.")):
            ax.axhline(value, color="gray", linestyle=style, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (paper convention)")
        ax.set_ylabel(f"perplexity ({ds[4:]})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _error_bars(g: pd.DataFrame, col: str):
    """(below, above) distances to ``min_<col>``/``max_<col>`` (grouped repeats), else None."""
    if f"min_{col}" not in g:
        return None
    return [(g[col] - g[f"min_{col}"]).fillna(0).clip(lower=0),
            (g[f"max_{col}"] - g[col]).fillna(0).clip(lower=0)]


def plot_layer_losses(runs: Sequence[Run], labels: Sequence[str], path: Path) -> bool:
    """Quantization loss per decoder layer (log), one curve per run. False: no layer data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = [(lab, sorted((layer["index"], layer["loss"]) for layer in r.results.get("layers") or []))
              for r, lab in zip(runs, labels)]
    curves = [(lab, pts) for lab, pts in curves if pts]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for lab, pts in curves:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=lab)
    if all(p[1] > 0 for _, pts in curves for p in pts):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("quantization loss (sum over its linears)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_report(dirs: Sequence[Path], out: Path, wandb_dirs: Sequence[Path] = (),
                 noise_out: list[str] | None = None, test: str = "welch") -> pd.DataFrame:
    """Write report.md, report.csv and plots into ``out``; returns the per-run table. With
    repeated configs also report_groups.csv and report_comparisons.csv, and the grouped
    sections' markdown is appended to ``noise_out``. ``test``: hbllm.stats.compare's test."""
    runs = find_runs(dirs, wandb_dirs)
    if not runs:
        raise SystemExit(f"no {RESULTS} under {', '.join(map(str, [*dirs, *wandb_dirs]))}")
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([run_row(r) for r in runs])
    table.to_csv(out / "report.csv", index=False)

    group_frames: list[pd.DataFrame] = []
    cmp_frames: list[pd.DataFrame] = []
    md = ["# HBLLM sweep report", "",
          f"{len(runs)} run(s) from {', '.join(map(str, [*dirs, *wandb_dirs]))}. Bits are per "
          "weight (paper convention and full accounting); perplexity is lower-is-better.", ""]
    for sweep in dict.fromkeys(r.sweep for r in runs):
        sruns = [r for r in runs if r.sweep == sweep]
        done = [r for r in sruns if is_done(r.results)]
        keys, repeat_keys = split_keys(swept_keys(sruns))
        md += [f"## {sweep}", "", f"{len(done)} of {len(sruns)} run(s) done; swept: "
               f"{', '.join(keys) if keys else 'nothing'}; model(s): "
               f"{', '.join(sorted({str(r.results.get('model')) for r in sruns}))}.", ""]
        groups = group_runs(done, keys, _swept_value)
        if any(len(g) > 1 for g in groups):
            gdf, cmp, text = _noise_sections(done, groups, keys, repeat_keys, sweep, out, test)
            md += text
            if noise_out is not None:
                noise_out += [f"## {sweep}", "", *text]
            group_frames.append(gdf.assign(sweep=sweep))
            cmp_frames.append(cmp.assign(sweep=sweep))
        elif done:
            df = pd.DataFrame([run_row(r) for r in done])
            nums = [r.num for r in done]
            for k in keys:  # overrides, or the config values of W&B runs
                df[k] = [_swept_value(r, k) for r in done]
            metrics = [c for c in _metric_columns(df) if c in df.columns]
            for key in keys or [None]:
                others = [k for k in keys if k != key]
                cols = ([key] if key else []) + others + ["method"] + metrics
                part = df[cols]
                if key:
                    part = part.iloc[_order(list(part[key]), nums)]
                md += [f"### {key or 'runs'}", "", _md_table(part), ""]
            slug = _slug(sweep)
            if plot_ppl_vs_bits(df, keys, out / f"{slug}_ppl_vs_bits.png"):
                md += [f"![perplexity vs bits]({slug}_ppl_vs_bits.png)", ""]
            labels = [_label(row, keys) for _, row in df.iterrows()]
            if plot_layer_losses(done, labels, out / f"{slug}_layer_loss.png"):
                md += [f"![per-layer loss]({slug}_layer_loss.png)", ""]
        rest = [r for r in sruns if not is_done(r.results)]
        if rest:
            md += ["Not finished:", ""]
            md += [f"- `{r.path}`: {r.status}"
                   + (f" ({r.results['error']})" if r.results.get("error") else "") for r in rest]
            md += [""]
    done = [r for r in runs if is_done(r.results)]
    if done:
        md += frontier_section(pd.DataFrame([run_row(r) for r in done]), out, FULL_PRECISION_BITS)
    (out / "report.md").write_text("\n".join(md))
    for name, frames in (("report_groups.csv", group_frames), ("report_comparisons.csv", cmp_frames)):
        if frames:
            pd.concat(frames).to_csv(out / name, index=False)
        else:
            (out / name).unlink(missing_ok=True)  # none from an earlier report of other runs
    return table


def log_to_wandb(out: Path, project: str) -> None:
    """Log the report just written to ``out`` as W&B tables (``runs``; with repeats also
    ``groups`` and ``comparisons``) in a run of job type ``report`` (offline without an API key
    or with WANDB_MODE=offline; the run's files land under ``out``)."""
    import wandb

    from .tracking import effective_mode

    mode = effective_mode("online")
    if mode == "disabled":
        return
    run = wandb.init(project=project, job_type="report", name=f"report-{out.name}", dir=str(out),
                     mode=mode, reinit="finish_previous")
    try:
        for name in ("runs", "groups", "comparisons"):
            path = out / ("report.csv" if name == "runs" else f"report_{name}.csv")
            if path.exists():
                df = pd.read_csv(path)
                run.log({name: wandb.Table(dataframe=df.astype(object).where(df.notna(), None))})
    finally:
        run.finish()


def _swept_value(run: Run, key: str) -> object:
    """A run's value of a swept key: its override, else its resolved config's value."""
    return run.overrides.get(key, _flatten(run.results.get("config") or {}).get(key))


def _noise_sections(done: list[Run], groups, keys: list[str], repeat_keys: list[str],
                    sweep: str, out: Path, test: str):
    """Report sections of a sweep with repeated configs: one row per group (n, geometric mean,
    spread and range of each perplexity), the pairwise comparisons, plots with error bars.
    Returns (the grouped table, the comparisons, markdown lines)."""
    df = pd.DataFrame([run_row(r) for r in done])
    for k in keys:
        df[k] = [_swept_value(r, k) for r in done]
    gdf, raw = group_rows(df, groups, keys)
    nums = [done[g[0]].num for g in groups]
    metrics = [c for c in ["n", *_metric_columns(gdf)] if c in gdf.columns]
    md = [f"Repeats over {', '.join(repeat_keys) or 'identical configs'}: {len(done)} runs in "
          f"{len(groups)} configs. Perplexity: geometric mean (x/ geometric std, min-max) over "
          "the n runs of a config; other numbers: mean.", ""]
    for key in keys or [None]:
        others = [k for k in keys if k != key]
        cols = ([key] if key else []) + others + ["method"] + metrics
        cols = [c for c in cols if c in gdf.columns]
        part = gdf.iloc[_order(list(gdf[key]), nums)] if key else gdf
        md += [f"### {key or 'runs'} (grouped)", "", grouped_table(part, cols, _fmt), ""]
    cmp = comparisons(gdf, raw, keys, test)
    if not cmp.empty:
        md += ["### differences against noise", "",
               "Ratio of geometric-mean perplexities b / a, and whether it exceeds the run-to-run "
               f"spread: {TEST_NAMES[test]} on log-perplexity over the runs (p < {ALPHA}: "
               "significant, else within noise; untested: too few runs for the test). "
               "See docs/sweeps.md, \"Noise\".", "", comparison_table(cmp), ""]
    slug = _slug(sweep)
    if plot_ppl_vs_bits(gdf, keys, out / f"{slug}_ppl_vs_bits.png"):
        md += [f"![perplexity vs bits]({slug}_ppl_vs_bits.png) (bars: min-max over the runs "
               "of a config)", ""]
    for k in repeat_keys:
        df[k] = [_swept_value(r, k) for r in done]
    labels = [_label(row, [*keys, *repeat_keys]) for _, row in df.iterrows()]
    if plot_layer_losses(done, labels, out / f"{slug}_layer_loss.png"):
        md += [f"![per-layer loss]({slug}_layer_loss.png)", ""]
    return gdf, cmp, md


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hbllm-report", description="Tables, CSV and plots from hbllm runs and sweeps.")
    parser.add_argument("dirs", nargs="*", type=Path, help="run or multirun directories")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="where report.md/report.csv/*.png go (default: the first DIR)")
    parser.add_argument("--wandb", type=Path, action="append", default=[], metavar="DIR",
                        help="also read offline W&B runs under DIR (their files/results.json)")
    parser.add_argument("--log-wandb", metavar="PROJECT", nargs="?", const="hbllm", default=None,
                        help="log the report's tables to W&B project PROJECT (default hbllm)")
    parser.add_argument("--test", choices=TESTS, default="welch",
                        help="test of differences between repeated configs (docs/sweeps.md)")
    args = parser.parse_args(argv)
    if not args.dirs and not args.wandb:
        parser.error("give at least one run/multirun DIR or --wandb DIR")
    out = args.out or (args.dirs or args.wandb)[0]
    noise: list[str] = []
    table = build_report(args.dirs, out, args.wandb, noise_out=noise, test=args.test)
    if noise:
        print("\n".join(noise))
    print(f"{len(table)} run(s) -> {out / 'report.md'}, {out / 'report.csv'}")
    if args.log_wandb:
        log_to_wandb(out, args.log_wandb)


if __name__ == "__main__":
    main()

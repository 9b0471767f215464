"""The tables of RESULTS.md, from the runs kept in runs/ (results.json of each run).

    python experiments/gemma3-270m/tables.py [RUNS_DIR]

Main table: every run of the gemma3_study sweep; ratio = perplexity / fp16 perplexity on the same
windows. Ablations: hbllm_row (l2 salient score, row split) against the l1 and global variants.
Zero-shot: accuracy of the gemma3_zeroshot runs. These use seed 0; the last two tables are the
repeats of hbllm_row, billm and hbllm_col (sweep gemma3_seeds plus the main study's run:
geometric mean, spread, range, and the comparisons of hbllm.stats).
"""
import json
import sys
from pathlib import Path

from hbllm.results import is_done

SETS = ("wikitext2", "ptb", "wiki_sample")
ORDER = ("fp16", "sign", "billm", "hbllm_row", "hbllm_col", "hbllm_row_shared", "hbllm_col_shared")


def load_all(runs: Path, sweep: str) -> list:
    """[(label, results)] of the finished runs of one sweep (label: quant.name or method)."""
    out = []
    for f in sorted((runs / sweep).glob("*/*/results.json")):
        res = json.loads(f.read_text())
        if is_done(res):
            out.append((f.parent.parent.name, res))
    return out


def load(runs: Path, sweep: str) -> dict:
    """{label: results} of the seed-0, unjittered runs of one sweep (the main tables)."""
    return {label: res for label, res in load_all(runs, sweep)
            if res["config"].get("seed", 0) == 0 and res["config"].get("repeat", 0) == 0}


# thread count of each sweep's runs (run.sh: OMP_NUM_THREADS=2; run_seeds.sh: 1); not recorded in
# results.json, but part of the float order: a run at another thread count is a float-order repeat
THREADS = {"gemma3_study": 2, "gemma3_seeds": 1}


def noise_tables(runs: Path, methods=("hbllm_row", "billm", "hbllm_col")) -> None:
    """Repeats of ``methods``: the seed runs (gemma3_seeds, one thread) and the main study's
    seed-0 run (two threads: same config, another float order). Per method n, the runs, and the
    geometric mean, spread and range of each perplexity; then every pair compared with
    hbllm-report's test (hbllm.stats.compare: Welch t on log-perplexity)."""
    from hbllm.stats import compare, summarize

    ppl = {m: {s: [] for s in SETS} for m in methods}
    members = {m: [] for m in methods}
    for sweep, threads in THREADS.items():
        found = [(res["config"].get("seed", 0), label, res) for label, res in load_all(runs, sweep)
                 if label in ppl and res["config"].get("repeat", 0) == 0]
        for seed, label, res in sorted(found, key=lambda t: t[0]):
            members[label].append(f"s{seed}/{threads}t")
            for s in SETS:
                ppl[label][s].append(res["ppl"][s])
    print("\n| method | n | runs (seed/threads) | " + " | ".join(f"ppl {s}" for s in SETS) + " |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        cells = [summarize(ppl[m][s], log=True) for s in SETS]
        print(f"| {m} | {len(members[m])} | {' '.join(members[m])} | "
              + " | ".join(c.format() if c else "-" for c in cells) + " |")
    print("\n| a | b | " + " | ".join(f"{s}: b/a" for s in SETS) + " |")
    print("|---|---|---|---|---|")
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            if members[a] and members[b]:
                print(f"| {a} | {b} | " + " | ".join(
                    compare(ppl[a][s], ppl[b][s]).format() for s in SETS) + " |")


def fmt(v: float) -> str:
    return f"{v:.3g}" if v >= 1e5 else f"{v:.4g}" if v < 100 else f"{v:.1f}"


def main(runs: Path) -> None:
    study = load(runs, "gemma3_study")
    fp = study.get("fp16", {}).get("ppl", {})
    print("| method | bits paper | bits full | " + " | ".join(f"ppl {s}" for s in SETS)
          + " | ratio to fp16 (" + " / ".join(SETS) + ") | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in sorted(study, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        r = study[name]
        ppl, bits = r["ppl"], r["bits"]
        ratio = " / ".join(fmt(ppl[s] / fp[s]) if s in fp else "-" for s in SETS)
        print(f"| {name} | {bits['paper']:.3f} | {bits['full']:.3f} | "
              + " | ".join(fmt(ppl[s]) for s in SETS)
              + f" | {ratio} | {r['timing'].get('quantize_s', 0):.0f} |")
    base = study.get("hbllm_row")
    rows = [("l2 salient, row split (= hbllm_row)", base)]
    for sweep, label in (("ablation_salient", "l1 salient"), ("ablation_grouping", "global split")):
        for res in load(runs, sweep).values():
            rows.append((label, res))
    print("\n| hbllm_row variant | bits paper | bits full | " + " | ".join(f"ppl {s}" for s in SETS)
          + " | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        if r:
            print(f"| {label} | {r['bits']['paper']:.3f} | {r['bits']['full']:.3f} | "
                  + " | ".join(fmt(r["ppl"][s]) for s in SETS) + f" | {r['timing']['quantize_s']:.0f} |")
    zs = load(runs, "gemma3_zeroshot")
    if zs:
        print("\n| method | task | acc | acc stderr | acc_norm | acc_norm stderr | n |")
        print("|---|---|---|---|---|---|---|")
        for name in sorted(zs, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
            for task, m in (zs[name].get("zeroshot") or {}).items():
                if isinstance(m, dict):
                    print(f"| {name} | {task} | " + " | ".join(
                        f"{m.get(k, float('nan')):.3f}" for k in ("acc", "acc_stderr", "acc_norm",
                                                                  "acc_norm_stderr"))
                          + f" | {m.get('samples', '')} |")


if __name__ == "__main__":
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "runs"
    main(runs_dir)
    noise_tables(runs_dir)

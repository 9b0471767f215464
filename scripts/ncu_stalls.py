"""Where a kernel's warps stall, from an ncu source-page CSV (per SASS instruction).

    ncu --clock-control none --kernel-name regex:hbllm_cb --launch-skip 3 --launch-count 1 \\
        --section SourceCounters --section WarpStateStats --import-source no -o cb16 \\
        python3 scripts/profile_gemv.py cb 16 11008 4096
    ncu -i cb16.ncu-rep --page source --csv --print-source sass > cb16_sass.csv
    python3 scripts/ncu_stalls.py cb16_sass.csv [--window 100] [--top 15]

Prints the share of the warp-stall samples per window of consecutive instructions (with the
window's warp-level executions and first instruction), then the instructions with the most samples and
their top stall reason. Reads plain or gzipped CSV.
"""
from __future__ import annotations

import argparse
import csv
import gzip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    opener = gzip.open if args.csv.endswith(".gz") else open
    with opener(args.csv, "rt") as f:
        rows = [r for r in csv.reader(f)]
    head = next(i for i, r in enumerate(rows) if "Source" in r and "Address" in r)
    hdr, data = rows[head], rows[head + 1:]
    src, samp, ex = (hdr.index(k) for k in ("Source", "Warp Stall Sampling (All Samples)",
                                           "Instructions Executed"))
    reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    val = [float(r[samp] or 0) for r in data]
    total = sum(val)
    print(f"{len(data)} instructions, {total:.0f} samples")
    for w in range(0, len(data), args.window):
        share = sum(val[w:w + args.window]) / total
        if share >= 0.01:
            done = sum(float(r[ex] or 0) for r in data[w:w + args.window])
            print(f"  [{w:5d} ..] {100 * share:5.1f}%  executed {done:10.0f}  {data[w][src].strip()[:48]}")
    for i in sorted(range(len(data)), key=val.__getitem__, reverse=True)[:args.top]:
        why = max(reasons, key=lambda k: float(data[i][k] or 0))
        print(f"  {i:5d} {100 * val[i] / total:5.1f}%  {hdr[why]:20s} {data[i][src].strip()[:60]}")


if __name__ == "__main__":
    main()

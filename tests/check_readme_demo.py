"""Check the demo run's results against the table the README prints (run by .ci/run right after
the demo, so no extra Gemma quantization is needed):

    hbllm experiment=demo data.local_dir=../shared/data
    python tests/check_readme_demo.py experiment=demo data.local_dir=../shared/data

The overrides locate the run directory exactly as the app names it (the resume key). Tolerances:
full-precision perplexity 1% (no quantization choice involved: only float32 summation order
differs between machines), HBLLM perplexity 3% (a split or salient choice within float32 noise
can flip, docs/quantizers.md deviation 7), bits to the README's 3 decimals (+-0.0005).
Exits non-zero with the differences.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from hbllm.results import DONE, is_done

REPO = Path(__file__).resolve().parents[1]
FP_RTOL, QUANT_RTOL, BITS_ATOL = 0.01, 0.03, 0.0005


def readme_table() -> dict:
    """{"ppl": {dataset: (fp, quantized)}, "bits": (paper, full)} from the README's demo table."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("prints, with `data.local_dir=../shared/data`:"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    table = {"ppl": {}, "bits": None}
    for line in block.splitlines():
        if m := re.match(r"ppl (\S+)\s+([\d.]+)\s+([\d.]+)\s*$", line):
            table["ppl"][m[1]] = (float(m[2]), float(m[3]))
        elif m := re.match(r"bits/weight paper\|full\s+([\d.]+) \| ([\d.]+)\s*$", line):
            table["bits"] = (float(m[1]), float(m[2]))
    if not table["ppl"] or table["bits"] is None:
        raise SystemExit(f"could not read the demo table from README.md:\n{block}")
    return table


def run_dir(overrides: list) -> Path:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import hbllm.app  # noqa: F401  (registers the schema and resolvers)

    with initialize_config_dir(str(REPO / "hbllm" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return REPO / cfg.hydra.run.dir


def differences(table: dict, results: dict) -> list:
    out = []
    if not is_done(results):
        out.append(f"status {results.get('status')!r}, not {DONE!r}")
    for d, (fp, q) in table["ppl"].items():
        for got, want, rtol, what in ((results.get("baseline_ppl", {}).get(d), fp, FP_RTOL, "fp"),
                                      (results.get("ppl", {}).get(d), q, QUANT_RTOL, "hbllm")):
            if got is None or abs(got - want) > rtol * want:
                out.append(f"ppl {d} {what}: README {want}, run {got} (tolerance {rtol:.0%})")
    bits = results.get("bits", {})
    for kind, want in zip(("paper", "full"), table["bits"]):
        if bits.get(kind) is None or abs(bits[kind] - want) > BITS_ATOL:
            out.append(f"bits {kind}: README {want}, run {bits.get(kind)}")
    return out


def main(overrides: list) -> int:
    table = readme_table()
    path = run_dir(overrides) / "results.json"
    if not path.is_file():
        print(f"no results.json at {path}: run `hbllm {' '.join(overrides)}` first")
        return 1
    bad = differences(table, json.loads(path.read_text()))
    for line in bad:
        print(f"README demo table differs: {line}")
    if not bad:
        print(f"README demo table matches {path} ({len(table['ppl'])} datasets and bits)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

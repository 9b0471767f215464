"""Per-layer GPTQ loss of two runs, side by side (from their results.json).

    python experiments/gemma3-270m/compare_layers.py RUN_DIR_A RUN_DIR_B

Layer 0 is an exact same-input comparison: both methods see the same calibration inputs and the
same Hessian there. From layer 1 on, each run's inputs come from its own quantized earlier layers,
so the losses also carry the error each method has accumulated.
"""
import json
import sys
from pathlib import Path


def layers(run_dir: str) -> tuple[str, dict]:
    """(method, {layer index: layer record}) of one run directory."""
    res = json.loads((Path(run_dir) / "results.json").read_text())
    return res["method"], {layer["index"]: layer for layer in res.get("layers", [])}


def main(a: str, b: str) -> None:
    (name_a, la), (name_b, lb) = layers(a), layers(b)
    common = sorted(set(la) & set(lb))
    print(f"| layer | {name_a} loss | {name_b} loss | {name_a}/{name_b} | {name_a} s | {name_b} s |")
    print("|---|---|---|---|---|---|")
    for i in common:
        x, y = la[i]["loss"], lb[i]["loss"]
        print(f"| {i} | {x:.1f} | {y:.1f} | {x / y:.3f} | {la[i]['time_s']:.0f} | {lb[i]['time_s']:.0f} |")
    if 0 in common:
        print(f"\nlayer 0 per linear ({name_a} / {name_b} loss):")
        for lin, rec in la[0]["linears"].items():
            other = lb[0]["linears"].get(lin)
            if other:
                print(f"  {lin}: {rec['loss']:.2f} / {other['loss']:.2f} = {rec['loss'] / other['loss']:.3f}"
                      f"  (bits paper {rec['bits_paper']:.3f} vs {other['bits_paper']:.3f},"
                      f" full {rec['bits_full']:.3f} vs {other['bits_full']:.3f})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

"""SASS of a packed kernel variant without a GPU: instruction mix, registers and the loop bodies.

    pip install nvidia-cuda-nvrtc==13.0.88 && pip install --target /tmp/cu nvidia-cuda-nvdisasm \\
        nvidia-cuda-cuobjdump && export HBLLM_CUDA_BIN=/tmp/cu/nvidia/cu13/bin
    PYTHONPATH=$PWD python scripts/sass_count.py cuda_codebook ROW=1 NT=16 BS=128 CB=4 ST=2 \\
        [--arch sm_90] [--dump k.sass]

MODULE is one of hbllm/packed's NVRTC kernels (cuda_lut, cuda_mma, cuda_codebook); the macros
are those of its ``macros()`` (all of them: ``DT``, ``SU`` ... as that function sets them).
Prints the static instruction count, registers and stack, the ten commonest opcodes, and for
each backward branch around tensor-core or table work its body's length and mix (the block
loop). ``--dump`` writes the disassembly (two dumps diff to show two sources compile alike).
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile

from hbllm.packed import nvrtc

INSTR = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def disassemble(binary: bytes) -> tuple[str, str]:
    """(nvdisasm text, cuobjdump resource usage) of a cubin."""
    tools = os.environ.get("HBLLM_CUDA_BIN", "")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(binary)
        f.flush()
        text = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], check=True,
                              capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    return text, res


def loops(text: str) -> list[tuple[int, collections.Counter]]:
    """(length, opcode mix) of every backward branch's body that holds MMA or shared loads."""
    ins, labels, out = [], {}, []
    for line in text.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ins)
        elif m := INSTR.match(line):
            ins.append((m.group(3), m.group(4)))
    for i, (op, rest) in enumerate(ins):
        target = re.search(r"(\.L_x_\d+)", rest) if op == "BRA" else None
        if target and labels.get(target.group(1), i + 1) <= i:
            body = collections.Counter(o.split(".")[0] for o, _ in ins[labels[target.group(1)]:i + 1])
            if body["HMMA"] or body["LDS"]:
                out.append((i + 1 - labels[target.group(1)], body))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module")
    ap.add_argument("macros", nargs="*", help="NAME=VALUE")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()
    kernel = importlib.import_module(f"hbllm.packed.{args.module}")
    macros = {k: int(v) for k, v in (m.split("=", 1) for m in args.macros)}
    lib = nvrtc.offline_library()
    if lib is None:
        raise SystemExit("no libnvrtc: pip install nvidia-cuda-nvrtc, or set HBLLM_NVRTC_LIB")
    binary, _ = nvrtc.compile_offline(nvrtc.full_source(kernel.SOURCE, "k", **macros), lib, args.arch)
    text, res = disassemble(binary)
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(text)
    ops = collections.Counter(m.group(3).split(".")[0] for line in text.splitlines()
                              if (m := INSTR.match(line)))
    usage = " ".join(w for w in res.split() if w.startswith(("REG:", "STACK:")))
    print(f"{sum(ops.values())} instructions, {usage}; commonest: {dict(ops.most_common(10))}")
    for length, body in loops(text):
        print(f"  loop of {length}: {dict(body.most_common(12))}")


if __name__ == "__main__":
    main()

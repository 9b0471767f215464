"""Plant known-bad mutants in a temporary copy of the repository and check the tests catch each.

    python scripts/mutation_check.py            # every mutant (a few minutes on 2 CPU cores)
    python scripts/mutation_check.py feed key   # mutants whose name contains one of the words

For each mutant: copy the tree (without .git and outputs) into a temporary directory, apply its
textual edits, run its test subset there (``PYTHONPATH`` = the copy, ``-x``); a failing run means
the mutant was caught. The unmutated copy runs the union of the subsets first: the subsets must
pass on correct code, or "caught" means nothing. Exits non-zero unless every mutant is caught.

The mutants are plain records below: when a file is renamed or a line rewritten, update the
record. An edit whose old text is missing (or not unique) stops the script with the record's name.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    edits: list[tuple[str, str, str]]  # (file relative to the repo, old text, new text)
    tests: list[str]  # pytest node ids / files relative to the repo


MUTANTS = [
    Mutant("full-precision feed (pipeline.py)", [
        ("hbllm/pipeline.py",
         "        hessians, counts = layer_hessians(layer, hidden, kwargs, device, todo)\n",
         "        hessians, counts = layer_hessians(layer, hidden, kwargs, device, todo)\n"
         "        fp_next = run_layer(layer, hidden, kwargs, device)\n"),
        ("hbllm/pipeline.py",
         "        hidden = run_layer(layer, hidden, kwargs, device)\n"
         "        layer.to(\"cpu\")\n        record[",
         "        hidden = fp_next\n        layer.to(\"cpu\")\n        record["),
    ], ["tests/test_sequential.py", "tests/test_pipeline.py"]),
    Mutant("ignored run key (results.py)", [
        ("hbllm/results.py", 'old if old.get("key") == key else {}', "old"),
    ], ["tests/test_app.py::test_changed_config_with_resume_on_starts_over"]),
    Mutant("ignored resume=false (results.py)", [
        ("hbllm/results.py", "read_json(self.path) if resume else {}", "read_json(self.path)"),
    ], ["tests/test_app.py::test_resume_false_with_the_same_config_starts_over"]),
    Mutant("dropped salient residual (quant/hbllm.py)", [
        ("hbllm/quant/hbllm.py", "    q[:, sal] += corr\n", ""),
    ], ["tests/test_quant_gptq.py", "tests/test_quant_reference.py"]),
    Mutant("negated block (quant/block_loop.py)", [
        ("hbllm/quant/block_loop.py", "        W[:, s:e] = q\n", "        W[:, s:e] = -q\n"),
    ], ["tests/test_quant_gptq.py", "tests/test_quant_reference.py"]),
    Mutant("compensation of the wrong sign (quant/block_loop.py)", [
        ("hbllm/quant/block_loop.py", "W[:, e:] -= err @ U[s:e, e:]", "W[:, e:] += err @ U[s:e, e:]"),
    ], ["tests/test_quant_gptq.py", "tests/test_quant_reference.py"]),
    Mutant("no update inside a GPTQ block (quant/gptq.py)", [
        ("hbllm/quant/gptq.py", "\n                W1[:, i:] -= torch.outer(e, U1[i, i:])\n", "\n"),
    ], ["tests/test_quant_rtn_gptq.py"]),
]

IGNORE = shutil.ignore_patterns(".git", "outputs", "multirun", "wandb", "__pycache__",
                                ".pytest_cache", "*.egg-info")


def copy_repo(dest: Path) -> Path:
    """The repository tree at ``dest/repo``, with ``dest/shared`` linked to ../shared (the
    tests look for ../shared/data beside the repository)."""
    shutil.copytree(REPO, dest / "repo", ignore=IGNORE)
    if (REPO.parent / "shared").exists():
        (dest / "shared").symlink_to((REPO.parent / "shared").resolve())
    return dest / "repo"


def apply(root: Path, mutant: Mutant) -> None:
    for rel, old, new in mutant.edits:
        path = root / rel
        if not path.is_file():
            sys.exit(f"mutant {mutant.name!r}: {rel} does not exist; update its record in "
                     f"{__file__}")
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            sys.exit(f"mutant {mutant.name!r}: the old text occurs {count} times in {rel} (must be "
                     f"once); update its record in {__file__}:\n{old}")
        mutated = text.replace(old, new)
        if rel.endswith(".py"):
            try:  # a mutant must be valid Python: a syntax error would be "caught" by every test
                compile(mutated, rel, "exec")
            except SyntaxError as exc:
                sys.exit(f"mutant {mutant.name!r} does not compile ({exc}); update its record in {__file__}")
        path.write_text(mutated)


def run_tests(root: Path, tests: list[str], stop_first: bool) -> tuple[int, float, str]:
    """(pytest exit code, seconds, output) of ``tests`` run in ``root``."""
    env = dict(os.environ, PYTHONPATH=str(root), WANDB_MODE="offline",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] * stop_first),
           *tests]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    return out.returncode, time.perf_counter() - t0, out.stdout + out.stderr


def first_failure(output: str) -> str:
    """The node id of the first failing test in pytest's short summary ("" if none)."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split()[1]
    return ""


def tail(output: str, lines: int = 5) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def main(words: list[str]) -> int:
    mutants = [m for m in MUTANTS if not words or any(w in m.name for w in words)]
    if not mutants:
        sys.exit(f"no mutant matches {words}; names: {[m.name for m in MUTANTS]}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hbllm-mutants-") as tmp:
        for m in mutants:  # every record must apply before anything runs
            apply(copy_repo(Path(tmp) / "check"), m)
            shutil.rmtree(Path(tmp) / "check")
        clean = copy_repo(Path(tmp) / "clean")
        subset = list(dict.fromkeys(t for m in mutants for t in m.tests))
        rc, seconds, output = run_tests(clean, subset, stop_first=False)
        print(f"unmutated copy: {'pass' if rc == 0 else 'FAIL'} ({seconds:.0f} s) {subset}")
        if rc != 0:
            print(tail(output))
            return 2
        rows = []
        for i, m in enumerate(mutants):
            root = copy_repo(Path(tmp) / f"m{i}")
            apply(root, m)
            rc, seconds, output = run_tests(root, m.tests, stop_first=True)
            verdict = {0: "SURVIVED", 1: "caught"}.get(rc, f"ERROR (pytest exit {rc})")
            rows.append((m.name, verdict, seconds, first_failure(output)))
            if rc not in (0, 1):
                print(f"{m.name}: pytest exit {rc}\n{tail(output)}")
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutant'.ljust(width)}  result    seconds  caught by")
    for name, verdict, seconds, by in rows:
        print(f"{name.ljust(width)}  {verdict.ljust(8)}  {seconds:7.1f}  {by}")
    caught = sum(r[1] == "caught" for r in rows)
    print(f"\n{caught}/{len(rows)} caught, {time.perf_counter() - start:.0f} s in all")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

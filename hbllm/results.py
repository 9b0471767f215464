"""``results.json`` of one run directory: its identity, one writer at a time, merged writes.

**Identity.** A run directory holds one quantized model, identified by :func:`model_key`: a hash
of what determines the quantized weights (``model``, ``calib``, ``quant``, ``seed``). Device,
logger, evaluation settings and output switches are not part of it, so changing them reuses the
quantization. Each evaluation stored beside the model carries its own key
(:func:`eval_keys`: the dataset and the settings that change its number), so adding a dataset,
the baseline or zero-shot to a finished run evaluates only what is new. :func:`experiment_id` and
:func:`finished` combine both; the app, the sweep launcher's skip rule and ``hbllm-report`` use
them. :func:`is_done` is the one reading of a run's recorded ``status`` (the app writes
:data:`DONE` when a run completes); :data:`EXPERIMENT_PARTS` names the config entries that say
what an experiment is (``hbllm-report``'s swept parameters are among them).

**Provenance.** :func:`code_revision` (written as ``code`` when a run starts or resumes) names
what produced the numbers: hbllm's version, the git commit of its source tree and whether it had
uncommitted changes, and torch's version. Results of two code revisions can differ by more than
a seed does (tie-breaking in the binarizers' searches), so a comparison should not mix them.

**One writer.** :class:`RunLock` takes an exclusive ``fcntl.flock`` on ``<run dir>/.lock`` for
the whole run. A second run of the same directory (a SLURM retry, a resubmitted sweep, another
terminal) *waits* for the first, logging the holder's host and PID, then finds the stored work
and does only what is still missing. Waiting (not failing) is chosen because two branches of a
sweep that differ only in evaluation settings share a directory by design.

**Merged writes.** :meth:`Results.write` re-reads results.json and applies this process's
changes on top of what is there, so nothing another writer stored is replaced by stale state.
The file is strict JSON: non-finite floats are written as ``null`` (``allow_nan=False``).
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_KEY_PARTS = ("model", "calib", "quant", "seed", "repeat")
# parts added after runs were recorded: left out at their default, so older runs keep their key
KEY_DEFAULTS = {"repeat": 0}
# display-only fields that do not change the quantized weights
_NOT_IN_MODEL = {"quant": ("name",), "model": ("name",)}
# EvalConfig fields that do not change an evaluation's number
_EVAL_NOISE = ("batch_size", "baseline", "datasets", "zeroshot")
_ZEROSHOT_NOISE = ("enabled", "batch_size")
# the top-level config entries that say what an experiment is: the model key's parts and the
# evaluation settings. The others say where and how it ran (logger, name, device, data location,
# resume, save_*); runs that differ only there are the same experiment.
EXPERIMENT_PARTS = (*MODEL_KEY_PARTS, "eval")
# the status a run records when it completed (``failed`` and ``running`` are the others)
DONE = "done"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_key(resolved: dict[str, Any]) -> str:
    """12 hex digits identifying the quantized model of a resolved config: model, calib, quant,
    seed and repeat (not evaluation, device, logger, name, resume, save_* ...)."""
    kept = {}
    for part in MODEL_KEY_PARTS:
        value = resolved.get(part)
        if part in KEY_DEFAULTS and value in (None, KEY_DEFAULTS[part]):
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _NOT_IN_MODEL.get(part, ())}
        kept[part] = value
    return _hash(kept)


def eval_keys(resolved: dict[str, Any]) -> dict[str, str]:
    """``{"<section>/<name>": key}`` of every evaluation a resolved config asks for: sections
    ``ppl`` and ``baseline_ppl`` (one entry per dataset), ``zeroshot`` and
    ``baseline_zeroshot`` (one entry, name ``all``). A key hashes what changes that number."""
    ev = resolved.get("eval", {})
    model = resolved.get("model", {})
    data = resolved.get("data", {})
    common = {k: v for k, v in ev.items() if k not in _EVAL_NOISE}
    common["seqlen"] = ev.get("seqlen") or model.get("seqlen")
    sections = ["ppl"] + (["baseline_ppl"] if ev.get("baseline") else [])
    out = {}
    for section in sections:
        for d in ev.get("datasets", []):
            source = {"local_dir": data.get("local_dir"),
                      "files": data.get("eval_files") if d == "text_files" else None}
            out[f"{section}/{d}"] = _hash({"dataset": d, **common, **source})
    zs = ev.get("zeroshot", {})
    if zs.get("enabled"):
        zkey = _hash({k: v for k, v in zs.items() if k not in _ZEROSHOT_NOISE})
        out["zeroshot/all"] = zkey
        if ev.get("baseline"):
            out["baseline_zeroshot/all"] = zkey
    return out


def experiment_id(resolved: dict[str, Any]) -> str:
    """The identity of a run's *numbers*: the model key and the keys of its evaluations (two
    results.json with the same identity report the same experiment)."""
    return f"{model_key(resolved)}-{_hash(sorted(eval_keys(resolved).items()))}"


def missing_evals(data: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """The ``section/name`` entries of :func:`eval_keys` not stored (with that key) in ``data``."""
    stored = data.get("eval_keys", {})
    return [k for k, v in eval_keys(resolved).items()
            if stored.get(k) != v or _lookup(data, k) is None]


def _lookup(data: dict[str, Any], entry: str):
    section, name = entry.split("/", 1)
    return data.get(section) if name == "all" else data.get(section, {}).get(name)


def is_done(data: dict[str, Any]) -> bool:
    """True when ``data`` (a results.json) records a completed run (status :data:`DONE`),
    whatever config it is read against: the rule of ``hbllm-report``'s tables."""
    return data.get("status") == DONE


def finished(data: dict[str, Any], resolved: dict[str, Any]) -> bool:
    """True when ``data`` (a results.json) holds the finished quantized model of ``resolved``
    and every evaluation it asks for: the one rule for "nothing left to do". A results.json
    without a key (written by another app) is finished when :func:`is_done`."""
    if "key" not in data:
        return is_done(data)
    return (data.get("key") == model_key(resolved) and data.get("quantized") is True
            and not missing_evals(data, resolved))


def code_revision() -> dict[str, Any]:
    """``{"hbllm", "git", "dirty", "torch"}``: the package version, the commit of the git checkout
    hbllm is imported from (``None`` for an installed wheel or without git) and whether tracked
    files differ from it, and torch's version."""
    import torch

    from . import __version__

    root = Path(__file__).resolve().parent.parent
    git = dirty = None
    try:
        def run(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        if Path(run("rev-parse", "--show-toplevel")).resolve() == root:
            git = run("rev-parse", "HEAD")
            dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"hbllm": __version__, "git": git, "dirty": dirty, "torch": torch.__version__}


class CorruptResults(ValueError):
    """results.json exists but is not readable JSON; the message says what to do."""


def read_json(path: Path) -> dict[str, Any]:
    """A results.json as a dict; {} when absent. Corrupt files raise :class:`CorruptResults`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptResults(
            f"{path} is not valid JSON ({err}). Move it away (e.g. `mv {path} {path}.bad`) and "
            "rerun: the stored layers and evaluations of the run directory are read again where "
            "possible, the rest is recomputed") from err


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON text (NaN/Infinity -> null)."""
    return json.dumps(strict(obj), indent=2, default=str, allow_nan=False)


class RunLock:
    """Exclusive OS lock (``fcntl.flock``) on ``<run_dir>/.lock`` held for a whole run; waits
    for a holder, logging who it is. Released when the process ends, however it ends."""

    def __init__(self, run_dir: Path, poll_s: float = 1.0):
        self.path = Path(run_dir) / ".lock"
        self.poll_s = poll_s
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.warning("%s is in use by %s: waiting for it to finish (the same run "
                                "directory takes one writer at a time)", self.path.parent,
                                self.holder())
                    waited = True
                time.sleep(self.poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_DELETE = object()


class Results:
    """The results.json of a run directory (hold its :class:`RunLock` while writing).
    ``resume=False`` or a different model key starts over."""

    def __init__(self, path: Path, key: str, resume: bool = True):
        self.path = Path(path)
        self.key = key
        self._changes: list[tuple[tuple[str, ...], Any]] = []
        old = read_json(self.path) if resume else {}
        self.data: dict[str, Any] = old if old.get("key") == key else {}
        self.resumed = bool(self.data)
        self._fresh = not resume  # resume=false: the first write drops what is on disk
        self.data["key"] = key

    def get(self, name: str, default=None):
        return self.data.get(name, default)

    def update(self, **values) -> None:
        """Set top-level entries and rewrite the file (merged, atomically)."""
        for k, v in values.items():
            self.data[k] = v
            self._changes.append(((k,), copy.deepcopy(v)))
        self.write()

    def pop(self, name: str) -> None:
        """Remove a top-level entry (and rewrite)."""
        self.data.pop(name, None)
        self._changes.append(((name,), _DELETE))
        self.write()

    def set_in(self, section: str, name: str, value) -> None:
        """Set ``data[section][name] = value`` (e.g. one dataset's perplexity) and rewrite."""
        self.data.setdefault(section, {})[name] = value
        self._changes.append(((section, name), copy.deepcopy(value)))
        self.write()

    def write(self) -> None:
        """Re-read the file and apply this process's changes on top: merge, never replace."""
        disk = {} if self._fresh else read_json(self.path)
        if disk.get("key") != self.key:
            disk = {"key": self.key}
        for path, value in self._changes:
            node = disk
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            if value is _DELETE:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = copy.deepcopy(value)
        self.data = disk
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(dumps(disk))
        os.replace(tmp, self.path)
        self._fresh = False

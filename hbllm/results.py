"""``results.json`` of one run: written atomically as values become known, and the resume key.

The key is a hash of the resolved config without the parts that do not change results
(``logger``, ``resume``, ``name``). The Hydra run directory is named after it (see
``conf/config.yaml``), so rerunning an identical config finds its own results.json: a ``done``
run is skipped; a partial run keeps every stored stage (baseline perplexities and zero-shot),
and reuses the quantized model saved by ``save_model=true`` instead of quantizing again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict

NOT_IN_KEY = ("logger", "resume", "name", "hydra")
# fields added after runs were recorded: left out at their default, so older runs keep their key
KEY_DEFAULTS = {"repeat": 0}


def config_key(resolved: Dict[str, Any]) -> str:
    """12 hex digits identifying the experiment described by a resolved config dict."""
    kept = {k: v for k, v in resolved.items()
            if k not in NOT_IN_KEY and not (k in KEY_DEFAULTS and v == KEY_DEFAULTS[k])}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Results:
    """The results.json of a run directory. ``resume=False`` or a different key starts over."""

    def __init__(self, path: Path, key: str, resume: bool = True):
        self.path = Path(path)
        self.data: Dict[str, Any] = {}
        if resume and self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("key") == key:
                self.data = old
        self.resumed = bool(self.data)
        self.data["key"] = key

    @property
    def done(self) -> bool:
        return self.data.get("status") == "done"

    def get(self, name: str, default=None):
        return self.data.get(name, default)

    def update(self, **values) -> None:
        """Set top-level entries and rewrite the file (atomically)."""
        self.data.update(values)
        self.write()

    def set_in(self, section: str, name: str, value) -> None:
        """Set ``data[section][name] = value`` (e.g. one dataset's perplexity) and rewrite."""
        self.data.setdefault(section, {})[name] = value
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

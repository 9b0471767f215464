"""Raw splits of the standard datasets, from the Hugging Face hub or from ``data.local_dir``.

Every loader returns a :class:`datasets.Dataset` with one ``text`` column whose rows are exactly
the rows GPTQ-style code reads from the hub (wikitext lines, PTB sentences, C4 documents), so the
joining in :mod:`hbllm.data.streams` is the same whichever source the rows came from. A source
that cannot be had raises :class:`DataUnavailable` quickly; nothing here waits on network retries.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

from .. import hub


class DataUnavailable(RuntimeError):
    """A dataset split cannot be loaded; the message says which file or setting would fix it."""


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the hub and under ``data.local_dir``.

    local: split -> (subfolder, file name); the file is looked for in ``local_dir/subfolder``
    and directly in ``local_dir``. column: the hub column holding the text.
    """

    path: str
    name: str | None
    data_files: dict[str, str] | None
    column: str
    local: dict[str, tuple[str, str]]


C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz"}

SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource("wikitext", "wikitext-2-raw-v1", None, "text",
                           {"train": ("wikitext-2-raw", "wiki.train.raw"),
                            "validation": ("wikitext-2-raw", "wiki.valid.raw"),
                            "test": ("wikitext-2-raw", "wiki.test.raw")}),
    # The canonical ``ptb_text_only`` moved to this id (script-free copy of the same data).
    "ptb": HubSource("ptb-text-only/ptb_text_only", "penn_treebank", None, "sentence",
                     {"train": ("ptb", "ptb.train.txt"),
                      "validation": ("ptb", "ptb.valid.txt"),
                      "test": ("ptb", "ptb.test.txt")}),
    "c4": HubSource("allenai/c4", None, C4_FILES, "text",
                    {"train": ("c4", "c4-train.00000-of-01024.json.gz"),
                     "validation": ("c4", "c4-validation.00000-of-00008.json.gz")}),
}


def load_split(name: str, split: str, data) -> datasets.Dataset:
    """Rows of ``split`` of dataset ``name`` (wikitext2 | ptb | c4) as a one-column ``text`` Dataset.

    ``data`` is a :class:`hbllm.config.DataConfig`: with ``local_dir`` set, only local files are
    read (a missing file raises :class:`DataUnavailable` naming it); otherwise the hub is used.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; hub/local datasets are {sorted(SOURCES)}")
    src = SOURCES[name]
    if split not in src.local:
        raise ValueError(f"dataset {name!r} has no split {split!r} (has {sorted(src.local)})")
    if data.local_dir:
        return _load_local(name, src, split, Path(data.local_dir).expanduser())
    return _load_hub(name, src, split, offline=bool(data.offline))


def local_file(name: str, split: str, local_dir: Path) -> Path:
    """The local file holding ``split`` of ``name`` (raises :class:`DataUnavailable` if absent)."""
    sub, fname = SOURCES[name].local[split]
    candidates = [local_dir / sub / fname, local_dir / fname]
    for path in candidates:
        if path.is_file():
            return path
    raise DataUnavailable(
        f"{name} {split} split not found under data.local_dir={str(local_dir)!r}: expected "
        f"{candidates[0]} (or {candidates[1]}). Put the file there (layout in docs/data.md), "
        f"unset data.local_dir to use the Hugging Face hub, or choose another dataset "
        f"(e.g. calib.name=wiki_sample or text_files).")


def check_text_file(path: Path, what: str, chunk: int = 1 << 20) -> None:
    """Raise :class:`DataUnavailable` naming ``path`` when it is not UTF-8 text (a NUL byte or
    an invalid UTF-8 sequence), read in chunks of ``chunk`` bytes. Compressed files (which
    ``datasets`` decompresses) are not checked."""
    import codecs

    if Path(path).suffix in (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4"):
        return

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            final = not block
            nul = block.find(b"\0")
            if nul >= 0:
                raise DataUnavailable(f"{what}: {path} is a binary file (NUL byte at offset "
                                      f"{offset + nul}), not text: give UTF-8 text files")
            try:
                decoder.decode(block, final=final)
            except UnicodeDecodeError as err:
                raise DataUnavailable(
                    f"{what}: {path} is not UTF-8 text ({err.reason} near byte "
                    f"{offset + err.start}): convert it, e.g. `iconv -f latin1 -t utf-8`") from None
            if final:
                return
            offset += len(block)


def _load_local(name: str, src: HubSource, split: str, local_dir: Path) -> datasets.Dataset:
    path = str(local_file(name, split, local_dir))
    check_text_file(Path(path), f"data.local_dir ({name} {split})")
    if name == "c4":
        ds = datasets.load_dataset("json", data_files={split: path}, split=split)
        return ds.select_columns(["text"])
    if name == "wikitext2":
        # The hub's wikitext rows are the file's lines with their "\n"; blank lines become "".
        ds = datasets.load_dataset("text", data_files={split: path}, split=split,
                                   keep_linebreaks=True)
        return ds.map(lambda b: {"text": [t if t.strip() else "" for t in b["text"]]},
                      batched=True)
    # ptb: the hub's sentences are the file's lines, stripped.
    ds = datasets.load_dataset("text", data_files={split: path}, split=split)
    return ds.map(lambda b: {"text": [t.strip() for t in b["text"]]}, batched=True)


def _load_hub(name: str, src: HubSource, split: str, offline: bool) -> datasets.Dataset:
    reason = hub.offline_reason("data.offline=true" if offline else None)
    try:
        with hub.forced_offline(reason is not None):
            files = {split: src.data_files[split]} if src.data_files else None  # only this split
            ds = datasets.load_dataset(src.path, src.name, data_files=files, split=split)
    except OSError as exc:  # ConnectionError, FileNotFoundError (not on hub / not cached)
        where = (f"the hub cannot be used ({reason}) and it is not in the local datasets cache"
                 if reason else "the hub request failed")
        sub, fname = src.local[split]
        raise DataUnavailable(
            f"cannot load {name} {split} split ({src.path!r}"
            f"{', ' + repr(src.name) if src.name else ''}): {where}: {exc}. Fix: set "
            f"data.local_dir=DIR with {sub}/{fname} in it (layout in docs/data.md), or run once "
            f"with network access (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) to fill the cache, "
            f"or use calib.name=wiki_sample / eval.datasets=[wiki_sample], which need no network."
        ) from exc
    if src.column != "text":
        ds = ds.rename_column(src.column, "text")
    return ds.select_columns(["text"])


"""``wiki_sample``: the English Wikipedia sample shipped in the gensim wheel, as plain text.

The MediaWiki XML dump (206 pages, 106 of them articles; the rest are redirects) is parsed with
gensim's ``extract_pages`` and ``filter_wiki``, then the wiki formatting that ``filter_wiki`` keeps
(bold/italic quotes, ``== headings ==``, list bullets, gallery ``File:...|caption`` lines, ``alt=``
image texts, image sizes and options, stray ``|``) is reduced to plain lines. Articles are split BY
ARTICLE: article number ``k`` (0-based, dump order) goes to the evaluation part when
``k % EVAL_EVERY == EVAL_EVERY - 1``, to the calibration part otherwise. The extracted articles are
cached as JSON under ``$HBLLM_CACHE`` (default ``~/.cache/hbllm``), keyed by the dump's sha256.
"""
from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from pathlib import Path

from .sources import DataUnavailable

EVAL_EVERY = 5
DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CLEANER_VERSION = 6  # bump when clean_article changes, to invalidate caches

_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^[ \t]*(={2,})[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_BULLET = re.compile(r"^[*#:;]+")
_GALLERY = re.compile(r"^(?:(?:File|Image):[^|]*|[^|]*\.(?:jpe?g|png|gif|svg|tiff?))(?:\||$)", re.I)
_ALT = re.compile(r"\|?\balt=.*$")
_IMAGE_OPTS = re.compile(r"\b\d+(?:x\d+)?px|\|(?:thumb|thumbnail|frame|frameless|upright|left|right|center)\b")
_BLANKS = re.compile(r"\n{3,}")


def cache_dir() -> Path:
    """Root of hbllm's caches: ``$HBLLM_CACHE`` or ``~/.cache/hbllm``."""
    return Path(os.environ.get("HBLLM_CACHE", "~/.cache/hbllm")).expanduser()


def dump_path() -> Path:
    """The bz2 MediaWiki dump inside the installed gensim package."""
    try:
        import gensim
    except ImportError as exc:
        raise DataUnavailable("wiki_sample needs the gensim package (pip install gensim, or "
                              "pip install 'hbllm[demo]')") from exc
    return Path(gensim.__file__).parent / DUMP


def clean_article(raw: str) -> str:
    """MediaWiki markup of one article -> readable plain text (paragraphs split by blank lines)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = _HEADING.sub(r"\2", _QUOTES.sub("", filter_wiki(raw)))
    lines = []
    for line in text.splitlines():
        line = _ALT.sub("", _GALLERY.sub("", _BULLET.sub("", line.strip())))
        line = _IMAGE_OPTS.sub("", line).strip().strip("|").replace("|", " ")
        lines.append(line)
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def articles() -> list[dict[str, str]]:
    """All articles of the dump in dump order: [{"title", "text"}] (text starts with the title)."""
    path = dump_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / "wiki_sample" / f"{digest}-v{CLEANER_VERSION}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    from gensim.corpora.wikicorpus import extract_pages

    out = []
    with bz2.open(path, "rb") as f:
        for title, raw, _ in extract_pages(f, filter_namespaces=("0",)):
            if not raw or raw.lstrip().lower().startswith("#redirect"):
                continue
            body = clean_article(raw)
            if body:
                out.append({"title": title, "text": f"{title}\n\n{body}"})
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    tmp.replace(cached)  # atomic: concurrent runs never read a half-written cache
    return out


def split(part: str) -> list[dict[str, str]]:
    """The ``calib`` or ``eval`` part of the articles (disjoint, together all articles)."""
    if part not in ("calib", "eval"):
        raise ValueError(f"wiki_sample part must be 'calib' or 'eval', not {part!r}")
    want_eval = part == "eval"
    return [a for k, a in enumerate(articles())
            if (k % EVAL_EVERY == EVAL_EVERY - 1) == want_eval]

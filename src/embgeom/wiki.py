"""The demo's real English corpus: Wikipedia articles and news text shipped with gensim.

gensim's wheel carries two small English corpora as test data, which makes a demo
that runs offline on real natural text:

* ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``: a
  shortened Wikipedia dump (about 200 articles, "A" titles, 2016). We stream the
  XML, strip the wiki markup to plain prose with its case and punctuation intact
  (subword tokenizers need natural text, so gensim's lowercasing tokenizer is of no
  use here), and yield one document per paragraph;
* ``lee_background.cor``: 300 Australian news stories (Lee et al. 2005), one per line.

gensim is located with :func:`importlib.util.find_spec`; it is never imported.

The markup stripping is in embgeom.wikitext (`strip_wiki_markup` and
`wiki_paragraphs` are importable from here too).
"""
from __future__ import annotations

import bz2
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterator

from ._atomic import atomic_writer
from .errors import EmbgeomError
from .wikitext import DEFAULT_MIN_WORDS, strip_wiki_markup, wiki_paragraphs

__all__ = [
    "WIKI_FILE",
    "LEE_FILE",
    "gensim_test_data_dir",
    "wiki_path",
    "lee_path",
    "iter_wiki_articles",
    "strip_wiki_markup",
    "wiki_paragraphs",
    "wiki_documents",
    "lee_documents",
    "write_demo_corpus",
    "DEFAULT_MIN_WORDS",
]

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"

# --------------------------------------------------------------------------- locating the data


def gensim_test_data_dir() -> Path:
    """The folder of gensim's bundled test data, found without importing gensim."""
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbgeomError(
            "the demo corpus comes from gensim's bundled test data, but gensim is not installed; "
            "pip install 'gensim>=4.3' (or pip install 'embgeom[demo]'), or pass your own --corpus"
        )
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "test" / "test_data"
        if d.is_dir():
            return d
    raise EmbgeomError(
        f"gensim is installed at {list(spec.submodule_search_locations)} but has no test/test_data "
        "folder; reinstall it from a wheel (pip install --force-reinstall 'gensim>=4.3') or pass "
        "your own --corpus"
    )


def _data_file(name: str) -> Path:
    p = gensim_test_data_dir() / name
    if not p.is_file():
        raise EmbgeomError(
            f"gensim's test data file {p} is missing; reinstall gensim "
            "(pip install --force-reinstall 'gensim>=4.3') or pass your own --corpus"
        )
    return p


def wiki_path() -> Path:
    """Path of the shortened English Wikipedia dump shipped with gensim."""
    return _data_file(WIKI_FILE)


def lee_path() -> Path:
    """Path of the Lee background news corpus shipped with gensim."""
    return _data_file(LEE_FILE)


# --------------------------------------------------------------------------- the XML dump


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_DISAMBIG_RE = re.compile(
    r"\{\{\s*(?:disambig\w*|dab|hndis|geodis|numberdis|letter-number combination disambiguation|"
    r"set index article|sia|surname|given name)\s*[|}]",
    re.IGNORECASE,
)


def iter_wiki_articles(path: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(title, wikitext)`` of the main-namespace articles of a MediaWiki XML dump.

    ``path`` defaults to gensim's shortened dump; ``.bz2`` is decompressed on the fly.
    The XML is parsed incrementally and each page is freed once read. Redirects,
    pages outside the article namespace, and disambiguation/name-list pages are skipped.
    """
    p = Path(path) if path is not None else wiki_path()
    opener: Callable = bz2.open if p.suffix == ".bz2" else open
    try:
        fh = opener(p, "rb")
    except OSError as exc:
        raise EmbgeomError(f"cannot read the Wikipedia dump {p}: {exc}") from exc
    with fh:
        try:
            context = ET.iterparse(fh, events=("start", "end"))
            root = None
            for event, elem in context:
                if event == "start":
                    if root is None:
                        root = elem
                    continue
                if _local(elem.tag) != "page":
                    continue
                title = ns = text = None
                redirect = False
                for child in elem.iter():
                    name = _local(child.tag)
                    if name == "title":
                        title = child.text or ""
                    elif name == "ns":
                        ns = (child.text or "").strip()
                    elif name == "redirect":
                        redirect = True
                    elif name == "text":
                        text = child.text or ""
                elem.clear()
                if root is not None:
                    root.clear()  # drop references to finished pages
                if redirect or ns not in (None, "0") or not text:
                    continue
                if text.lstrip()[:9].lower() == "#redirect":
                    continue
                if "(disambiguation)" in (title or "") or _DISAMBIG_RE.search(text):
                    continue
                yield title or "", text
        except (ET.ParseError, OSError, EOFError) as exc:
            raise EmbgeomError(
                f"the Wikipedia dump {p} is damaged ({exc}); reinstall gensim or pass your own --corpus"
            ) from None


# --------------------------------------------------------------------------- templates and tables
def _budget(docs: Iterator[str], max_words: int | None) -> Iterator[str]:
    """Yield documents until ``max_words`` words; the document that would cross the
    budget is cut at a word boundary, so exactly min(max_words, available) words come out."""
    if max_words is None:
        yield from docs
        return
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 0:
        raise EmbgeomError(f"max_words must be a non-negative integer or None, got {max_words!r}")
    left = max_words
    if left == 0:
        return
    for doc in docs:
        words = doc.split()
        if len(words) >= left:
            yield doc if len(words) == left else " ".join(words[:left])
            return
        left -= len(words)
        yield doc


def wiki_documents(
    max_words: int | None = None,
    *,
    min_words: int = DEFAULT_MIN_WORDS,
    path: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Plain-English paragraphs of gensim's shortened Wikipedia dump, one document each.

    Articles in dump order, paragraphs in page order; deterministic. Words are
    whitespace-separated tokens; with ``max_words`` the stream stops after exactly
    that many words (the last document cut short), or at the end of the sample.
    ``path`` reads another MediaWiki XML dump (``.xml`` or ``.xml.bz2``) instead.
    """
    def paragraphs() -> Iterator[str]:
        for _, text in iter_wiki_articles(path):
            yield from wiki_paragraphs(text, min_words=min_words)

    return _budget(paragraphs(), max_words)


def lee_documents(max_words: int | None = None) -> Iterator[str]:
    """The 300 news stories of gensim's ``lee_background.cor``, one document each, in
    file order (``max_words`` as in :func:`wiki_documents`)."""
    p = lee_path()

    def lines() -> Iterator[str]:
        with open(p, "rb") as fh:
            for raw in fh:
                doc = " ".join(raw.decode("utf-8", errors="replace").split())
                if doc:
                    yield doc

    return _budget(lines(), max_words)


_SOURCES = {"wiki": wiki_documents, "lee": lee_documents}


def write_demo_corpus(
    path: str | os.PathLike, max_words: int | None = None, source: str = "wiki"
) -> Path:
    """Write the demo corpus as a ``.txt`` file, one document per line, and return its path.

    ``source`` is ``"wiki"`` (:func:`wiki_documents`) or ``"lee"``
    (:func:`lee_documents`). Line breaks inside a document become spaces. The file is
    written to a temporary name and renamed, so a partial file never appears.
    """
    if source not in _SOURCES:
        raise EmbgeomError(f"unknown demo corpus source {source!r}; use one of {', '.join(_SOURCES)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = _SOURCES[source](max_words)
    with atomic_writer(out, newline="\n") as fh:
        for doc in docs:
            line = " ".join(doc.split())
            if line:
                fh.write(line + "\n")
    return out

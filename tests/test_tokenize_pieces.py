"""Long documents are tokenized in bounded pieces (embgeom.windows): the tokens equal
those of the whole document, and a run that needs few tokens tokenizes little text
whatever the document's length. A corpus that is not a regular file is refused."""
from __future__ import annotations

import os

import pytest

from embgeom import windows
from embgeom.errors import EmbgeomError
from embgeom.windows import WindowPlan, iter_windows


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _plan(tok, seq_len=48, max_tokens=None):
    return WindowPlan(seq_len=seq_len, prefix=(), suffix=(), special_ids=frozenset(tok.all_special_ids),
                      exclude_special=False, exclude_positions=(), max_tokens=max_tokens)


class CountingTokenizer:
    """A tokenizer that counts the characters it is given."""

    def __init__(self, tok):
        self.tok, self.chars, self.calls = tok, 0, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, texts, **kw):
        self.calls += 1
        self.chars += len(texts) if isinstance(texts, str) else sum(map(len, texts))
        return self.tok(texts, **kw)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama", "t5"])
def test_pieces_give_the_tokens_of_the_whole_document(tiny_models, arch, monkeypatch):
    """With pieces of ~200 characters every real document is cut many times: the
    windows are those of tokenizing each document whole."""
    from conftest import lee_texts

    tok = _tokenizer(tiny_models[arch])
    docs = lee_texts(30)
    docs.append("  ".join(docs[:5]) + "\n\tend — “quoted” 12345 ünïcödé")  # runs of spaces, tabs, unicode
    whole = [(w.doc, w.start, list(w.ids)) for w in iter_windows(docs, tok, _plan(tok))]
    monkeypatch.setattr(windows, "LONG_DOC_CHARS", 300)
    monkeypatch.setattr(windows, "PIECE_CHARS", 200)
    monkeypatch.setattr(windows, "CONTEXT_CHARS", 40)
    counting = CountingTokenizer(tok)
    pieces = [(w.doc, w.start, list(w.ids)) for w in iter_windows(docs, counting, _plan(tok))]
    assert pieces == whole
    assert counting.calls > 3 * len(docs)  # the documents were cut into pieces indeed
    for d in docs:  # and each document's ids, run by run
        assert [t for run in windows._pieces(d, tok, 200, 40) for t in run] == \
            tok(d, add_special_tokens=False)["input_ids"]


def test_long_single_line_tokenizes_only_what_is_used(tiny_models, tmp_path):
    """A 6 MB one-line document with max_tokens 200: the text tokenized is one piece,
    not the document (before: all of it, 79 s and 9.3 GB for 50 MB)."""
    from conftest import lee_texts

    from embgeom.corpus import read_documents

    tok = _tokenizer(tiny_models["gpt2"])
    text = " ".join(lee_texts(40))
    line = (text + " ") * (6_000_000 // len(text) + 1)
    assert len(line) > 6_000_000
    path = tmp_path / "one-line.txt"
    path.write_text(line + "\n", encoding="utf-8")
    counting = CountingTokenizer(tok)
    got = list(iter_windows(read_documents(path), counting, _plan(tok, max_tokens=200)))
    assert sum(int(w.counted.sum()) for w in got) == 200
    assert counting.chars <= windows.PIECE_CHARS + 4 * windows.CONTEXT_CHARS
    assert counting.calls == 1
    # the same tokens as the whole line's first ones
    ids = [t for w in got for t in w.ids]  # the last window has its full context
    assert ids == tok(line[:20000], add_special_tokens=False)["input_ids"][:len(ids)]


def test_pipeline_reads_a_long_line_in_pieces(tiny_models, tmp_path, monkeypatch):
    """End to end: analyze() with max_tokens on a long one-line corpus tokenizes a
    bounded amount of text (the count and the stream share the windows)."""
    from conftest import lee_texts

    from embgeom import analyze

    chars = []
    real = windows._encode
    monkeypatch.setattr(windows, "_encode", lambda tok, texts, offsets=False: (
        chars.append(len(texts) if isinstance(texts, str) else sum(map(len, texts))), real(tok, texts, offsets))[1])
    text = " ".join(lee_texts(40))
    path = tmp_path / "one-line.txt"
    path.write_text((text + " ") * (2_000_000 // len(text) + 1) + "\n", encoding="utf-8")
    res = analyze(str(tiny_models["gpt2"]), str(path), max_tokens=100, seq_len=32, id_sample=0,
                  token_types="none", device="cpu")
    assert res.run["counts"]["tokens_counted"] == 100
    assert sum(chars) <= windows.PIECE_CHARS + 4 * windows.CONTEXT_CHARS


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_fifo_corpus_is_refused(tmp_path):
    from embgeom.corpus import corpus_fingerprint, read_documents

    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    with pytest.raises(EmbgeomError, match="is not a regular file"):
        next(iter(read_documents(fifo)))
    with pytest.raises(EmbgeomError, match="is not a regular file"):
        corpus_fingerprint(fifo)

"""Corpus readers (embgeom.corpus) and the demo's Wikipedia/news corpus (embgeom.wiki)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re

import pytest

from embgeom import corpus, corpus_columns
from embgeom.corpus import corpus_fingerprint, corpus_format, iter_documents, read_documents
from embgeom.errors import EmbgeomError

DOCS = ["The first document.", "Second one, with a comma", "Ünïcödé third — fine.", "4th"]


def _read(path, **kw):
    return list(read_documents(path, **kw))


# --------------------------------------------------------------------------- txt


def test_txt_one_document_per_line_blank_lines_skipped(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(
        "\ufeff  The first document.  \n\n   \nSecond one, with a comma\r\n"
        "Ünïcödé third — fine.\n\t\n4th".encode("utf-8")
    )
    assert _read(p) == DOCS
    assert _read(p) == DOCS  # deterministic, re-iterable from the path
    assert list(iter_documents(p)) == DOCS
    assert corpus_format(p) == "txt"


def test_txt_is_lazy_and_checks_path_early(tmp_path):
    with pytest.raises(EmbgeomError, match="does not exist"):
        read_documents(tmp_path / "nope.txt")  # raised on the call, before iterating
    p = tmp_path / "c.txt"
    p.write_text("a\nb\n")
    it = read_documents(p)
    p.write_text("c\n")  # the file is opened only when iteration starts
    assert list(it) == ["c"]


def test_txt_rejects_text_field(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("hello\n")
    assert _read(p, text_field="text") == ["hello"]
    with pytest.raises(EmbgeomError, match="--text-field 'body'.*one document per line"):
        read_documents(p, text_field="body")


def test_invalid_utf8_names_line_and_offset(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good line\nsecond \xff\xfe here\nthird\n")
    with pytest.raises(EmbgeomError) as exc:
        _read(p)
    msg = str(exc.value)
    assert str(p) in msg and "line 2" in msg and "byte offset 17" in msg
    assert "--encoding-errors replace" in msg
    assert _read(p, encoding_errors="replace") == ["good line", "second \ufffd\ufffd here", "third"]
    assert _read(p, encoding_errors="ignore") == ["good line", "second  here", "third"]


def test_encoding_errors_value_checked(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("x\n")
    with pytest.raises(EmbgeomError, match="encoding_errors.*strict, replace, ignore"):
        read_documents(p, encoding_errors="bogus")


def test_empty_or_blank_corpus_raises_at_end(tmp_path):
    for name, content in [("empty.txt", ""), ("blank.txt", "\n  \n\t\n"), ("blank.jsonl", '{"text": " "}\n\n')]:
        p = tmp_path / name
        p.write_text(content)
        it = read_documents(p)
        with pytest.raises(EmbgeomError, match=r"no non-blank document") as exc:
            list(it)
        assert str(p) in str(exc.value)


# --------------------------------------------------------------------------- path errors


def test_missing_path_unknown_extension_and_plain_directory(tmp_path):
    with pytest.raises(EmbgeomError, match="does not exist.*--corpus"):
        _read(tmp_path / "missing.jsonl")
    p = tmp_path / "c.docx"
    p.write_text("x")
    with pytest.raises(EmbgeomError) as exc:
        _read(p)
    assert "'.docx'" in str(exc.value) and ".txt, .jsonl, .csv, .parquet" in str(exc.value)
    j = tmp_path / "c.json"
    j.write_text("[]")
    with pytest.raises(EmbgeomError, match=r"\.jsonl"):
        corpus_format(j)
    d = tmp_path / "somedir"
    d.mkdir()
    (d / "a.txt").write_text("x\n")
    with pytest.raises(EmbgeomError, match="not a dataset saved by datasets' save_to_disk") as exc:
        _read(d)
    assert str(d) in str(exc.value)


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "secret.txt"
    p.write_text("hello\n")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root reads anything: simulate
        def deny(path):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(corpus, "_open_binary", deny)
    else:
        p.chmod(0)
    try:
        with pytest.raises(EmbgeomError, match="permission denied.*chmod") as exc:
            _read(p)
        assert str(p) in str(exc.value)
    finally:
        p.chmod(0o644)


# --------------------------------------------------------------------------- jsonl


def _write_jsonl(p, rows):
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_default_and_custom_field(tmp_path):
    p = tmp_path / "c.jsonl"
    _write_jsonl(p, [{"text": DOCS[0], "id": 1}, "", {"text": "   "}, {"text": None},
                     {"text": DOCS[1]}, {"text": DOCS[2]}, {"text": DOCS[3]}])
    assert _read(p) == DOCS
    q = tmp_path / "d.jsonl"
    _write_jsonl(q, [{"body": " keep  spacing ", "text": 3}, {"body": "b"}])
    assert _read(q, text_field="body") == [" keep  spacing ", "b"]
    assert corpus_format(q) == "jsonl"


def test_jsonl_errors_name_line_and_field(tmp_path):
    p = tmp_path / "c.jsonl"
    _write_jsonl(p, [{"text": "ok"}, "", {"content": "x", "id": 2}])
    with pytest.raises(EmbgeomError) as exc:
        _read(p)
    msg = str(exc.value)
    assert "line 3" in msg and "'text'" in msg and "'content', 'id'" in msg and "--text-field" in msg

    _write_jsonl(p, [{"text": "ok"}, {"text": 5}])
    with pytest.raises(EmbgeomError, match=r"line 2: field 'text' is a JSON number, not a string"):
        _read(p)

    _write_jsonl(p, [{"text": "ok"}, '{"text": "unterminated'])
    with pytest.raises(EmbgeomError, match=r"line 2 is not valid JSON"):
        _read(p)

    _write_jsonl(p, ['["a list"]'])
    with pytest.raises(EmbgeomError, match=r"line 1 is a JSON array, not an object"):
        _read(p)


def test_jsonl_invalid_utf8_and_replace(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "bad \xc3\x28 byte"}\n')
    with pytest.raises(EmbgeomError, match=r"line 2, byte offset 31"):
        _read(p)
    assert _read(p, encoding_errors="replace") == ["fine", "bad \ufffd( byte"]


# --------------------------------------------------------------------------- csv


def test_csv_reader(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text(
        'id,text,other\n1,"The first document.",x\n\n2,"",y\n3,"Second one, with a comma",z\n'
        '4,"Multi\nline ""quoted""",w\n',
        encoding="utf-8",
    )
    assert _read(p) == ["The first document.", "Second one, with a comma", 'Multi\nline "quoted"']
    assert _read(p, text_field="other") == ["x", "y", "z", "w"]
    assert corpus_format(p) == "csv"


def test_csv_long_field(tmp_path):
    p = tmp_path / "long.csv"
    long_doc = "word " * 40000  # 200 kB, over csv's default field limit
    p.write_text("text\n" + long_doc.strip() + "\n")
    assert _read(p) == [long_doc.strip()]


def test_csv_errors(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,body\n1,hello\n")
    with pytest.raises(EmbgeomError) as exc:
        _read(p)
    assert "no column 'text'" in str(exc.value) and "'id', 'body'" in str(exc.value)
    p.write_text("id,text\n1,hello\n2\n")
    with pytest.raises(EmbgeomError, match=r"line 3: the row has 1 field"):
        _read(p)
    p.write_text("")
    with pytest.raises(EmbgeomError, match="header row"):
        _read(p)
    p.write_bytes(b"text\nok\nbad \xff\n")
    with pytest.raises(EmbgeomError, match=r"line 3, byte offset 12.*--encoding-errors replace"):
        _read(p)
    assert _read(p, encoding_errors="replace") == ["ok", "bad \ufffd"]


# --------------------------------------------------------------------------- parquet


def test_parquet_reader_streams_in_batches(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [f"document number {i}." if i % 7 else "  " for i in range(2500)]
    docs[3] = None
    table = pa.table({"id": list(range(2500)), "text": docs})
    p = tmp_path / "c.parquet"
    pq.write_table(table, p, row_group_size=1000)
    monkeypatch.setattr(corpus_columns, "_PARQUET_BATCH_ROWS", 300)  # the Parquet reader lives there
    expected = [d for d in docs if d is not None and d.strip()]
    assert _read(p) == expected
    assert corpus_format(p) == "parquet"

    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), p)
    assert _read(p, text_field="body") == ["a", "b"]
    with pytest.raises(EmbgeomError) as exc:
        _read(p)
    assert "no column 'text'" in str(exc.value) and "'body', 'n'" in str(exc.value)
    with pytest.raises(EmbgeomError, match=r"column 'n' holds int64 values, not strings"):
        _read(p, text_field="n")

    p.write_bytes(b"not parquet at all")
    with pytest.raises(EmbgeomError, match="not a readable Parquet file"):
        _read(p)


# --------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def hf_datasets():
    return pytest.importorskip("datasets")


def test_datasets_dataset_and_dict(tmp_path, hf_datasets):
    ds = hf_datasets.Dataset.from_dict({"text": ["alpha one", "", "beta two", None, "gamma"], "n": [1, 2, 3, 4, 5]})
    d1 = tmp_path / "ds"
    ds.save_to_disk(str(d1))
    assert corpus_format(d1) == "datasets"
    assert _read(d1) == ["alpha one", "beta two", "gamma"]
    with pytest.raises(EmbgeomError, match=r"column 'n' holds"):
        _read(d1, text_field="n")
    with pytest.raises(EmbgeomError) as exc:
        _read(d1, text_field="body")
    assert "no column 'body'" in str(exc.value) and "'text', 'n'" in str(exc.value)

    dd = hf_datasets.DatasetDict(
        {
            "validation": hf_datasets.Dataset.from_dict({"text": ["val doc"]}),
            "train": hf_datasets.Dataset.from_dict({"text": ["train a", "train b"]}),
        }
    )
    d2 = tmp_path / "dd"
    dd.save_to_disk(str(d2))
    assert _read(d2) == ["train a", "train b"]  # `train` when present
    assert _read(d2 / "validation") == ["val doc"]  # a split's own directory

    dd2 = hf_datasets.DatasetDict(
        {
            "zeta": hf_datasets.Dataset.from_dict({"text": ["z"]}),
            "beta": hf_datasets.Dataset.from_dict({"text": ["b"]}),
        }
    )
    d3 = tmp_path / "dd2"
    dd2.save_to_disk(str(d3))
    assert _read(d3) == ["b"]  # otherwise the first split in sorted order

    fp = corpus_fingerprint(d2)
    assert fp["format"] == "datasets" and fp["n_files"] >= 3 and fp["size_bytes"] > 0
    assert corpus_fingerprint(d2) == fp


def test_datasets_missing_library(tmp_path, monkeypatch):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "state.json").write_text("{}")
    (d / "dataset_info.json").write_text("{}")
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(EmbgeomError, match="pip install datasets") as exc:
        _read(d)
    assert str(d) in str(exc.value)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_content_sensitive(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("one\ntwo\n")
    fp = corpus_fingerprint(p)
    assert set(fp) >= {"path", "format", "size_bytes", "mtime", "sha256"}
    assert fp["format"] == "txt" and fp["size_bytes"] == 8 and os.path.isabs(fp["path"])
    import hashlib

    assert fp["sha256"] == hashlib.sha256(b"one\ntwo\n").hexdigest()
    assert corpus_fingerprint(p) == fp
    st = os.stat(p)
    p.write_text("one\ntwO\n")  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    fp2 = corpus_fingerprint(p)
    assert fp2["sha256"] != fp["sha256"] and fp2["size_bytes"] == fp["size_bytes"]
    with pytest.raises(EmbgeomError, match="does not exist"):
        corpus_fingerprint(tmp_path / "gone.txt")


# --------------------------------------------------------------------------- wiki markup

from embgeom import wiki  # noqa: E402

_MARKUP_LEFTOVERS = ("{{", "}}", "[[", "]]", "<ref", "|}", "{|", "'''", "<!--")


def test_strip_templates_nested_links_refs():
    src = (
        "{{Infobox person|name=X|image={{flag|FR}} [[File:X.jpg|thumb|A [[caption]] here]]}}\n"
        "'''Alan''' was a [[France|French]] [[mathematician]]<ref name=\"a\">{{cite web|url=http://x.org|title=T}}</ref> "
        "born in [[Paris]]<ref name=a/> in {{circa|1900}}; he walked {{convert|5|km|mi}} daily "
        "and spoke {{lang|fr|''le français''}}.<!-- hidden --> See [http://example.org the site] and "
        "[[#Life|below]] &ndash; the end.{{citation needed|date=May 2020}}\n"
        "\n"
        "[[Category:Mathematicians]]\n[[de:Alan]]\n"
    )
    text = wiki.strip_wiki_markup(src)
    assert text == (
        "Alan was a French mathematician born in Paris in c. 1900; he walked 5 km daily and spoke "
        "le français. See the site and below – the end."
    )


def test_strip_tables_files_lists_headings_and_stop_sections():
    src = (
        "Intro paragraph one\ncontinues here.\n\n"
        "{| class=\"wikitable\"\n|-\n! Head\n|-\n| cell {{small|x}}\n{|\n| nested\n|}\n|}\n"
        "== History ==\n"
        "[[Image:Map.png|thumb|right|A map of [[Europe|the continent]]]]After the map.\n"
        "* First bullet item.\n# Numbered item.\n: Indented quote.\n"
        "<gallery>\nA.jpg|x\n</gallery>\n"
        "H<sub>2</sub>O is water.<br/>Next &amp; last.\n"
        "== References ==\n{{reflist}}\n* Some, Author. ''Book''. ISBN 1.\n"
        "== Legacy ==\nAfter references.\n"
    )
    paras = wiki.strip_wiki_markup(src).split("\n\n")
    assert paras == [
        "Intro paragraph one continues here.",
        "After the map.",
        "First bullet item.",
        "Numbered item.",
        "Indented quote.",
        "H2O is water. Next & last.",
        "After references.",
    ]


def test_wiki_paragraphs_filter_short_math_and_leftovers():
    prose = (
        "This sentence has plenty of ordinary words, so many in fact that it passes the minimum "
        "length filter of twenty words easily."
    )
    src = "\n\n".join([
        prose,
        "Too short.",
        "The formula <math>E = mc^2</math> is " + "very " * 20 + "famous.",
        "An unclosed {{template " + "word " * 25 + "ends.",
        prose.rstrip(".") + " without an end",
    ])
    assert wiki.wiki_paragraphs(src) == [prose]
    assert wiki.wiki_paragraphs(src, min_words=1)[:2] == [prose, "Too short."]


def test_budget_cuts_exactly():
    docs = iter(["a b c", "d e f g", "h i"])
    assert list(wiki._budget(docs, 5)) == ["a b c", "d e"]
    assert list(wiki._budget(iter(["a b"]), 10)) == ["a b"]
    assert list(wiki._budget(iter(["a b"]), 0)) == []
    with pytest.raises(EmbgeomError):
        list(wiki._budget(iter(["a"]), -1))


needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="gensim (its bundled test data) not installed"
)


@needs_gensim
def test_real_wiki_sample_is_clean_prose():
    docs = list(itertools.islice(wiki.wiki_documents(), 40))
    assert len(docs) == 40
    assert docs[0].startswith("Anarchism is a political philosophy")
    for d in docs:
        for bad in _MARKUP_LEFTOVERS:
            assert bad not in d, (bad, d)
        assert "\n" not in d and "  " not in d and d == d.strip()
        assert len(d.split()) >= wiki.DEFAULT_MIN_WORDS
        assert re.search(r"[A-Z]", d) and re.search(r"[.,]", d)
    assert docs == list(itertools.islice(wiki.wiki_documents(), 40))  # deterministic


@needs_gensim
def test_write_demo_corpus_roundtrip(tmp_path):
    out = wiki.write_demo_corpus(tmp_path / "sub" / "demo.txt", max_words=1500)
    assert out == tmp_path / "sub" / "demo.txt"
    docs = _read(out)
    assert sum(len(d.split()) for d in docs) == 1500
    assert docs[:3] == list(itertools.islice(wiki.wiki_documents(), 3))
    assert [p.name for p in out.parent.iterdir()] == ["demo.txt"]  # no temporary left

    lee = wiki.write_demo_corpus(tmp_path / "lee.txt", max_words=800, source="lee")
    assert sum(len(d.split()) for d in _read(lee)) == 800
    with pytest.raises(EmbgeomError, match="source"):
        wiki.write_demo_corpus(tmp_path / "x.txt", source="nope")


@needs_gensim
def test_lee_documents():
    docs = list(wiki.lee_documents())
    assert len(docs) == 300
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert all(d == d.strip() and "\n" not in d for d in docs)


def test_strip_template_edge_cases():
    src = (
        "{{Infobox thing\n| a = b\n| c = {{x|y}}\n|}}Start {{nowrap|of [[Some page|the]]}} text "
        "with {{lang-fr|la langue}} and {{as of|2015|6|lc=y}} a {{frac|1|2}} share, {{convert|3|-|5|C}}.\n"
        "{{Quote box|quote={| \n| table in template\n|}\n}}End."
    )
    assert wiki.strip_wiki_markup(src) == (
        "Start of the text with la langue and as of June 2015 a 1/2 share, 3–5°C. End."
    )

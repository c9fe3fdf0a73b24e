"""Corpus readers: a path in, a deterministic stream of documents (strings) out.

Supported inputs:

* ``.txt``      one document per line (``\\n``-separated; surrounding whitespace of
  each line is stripped);
* ``.jsonl``    one JSON object per line; the document is field ``text`` (or
  ``text_field``);
* ``.csv``      a header row, then one document per record, column ``text`` (or
  ``text_field``); quoted fields may span lines;
* ``.parquet``  column ``text`` (or ``text_field``), read in row batches;
* a directory written by ``datasets``' ``save_to_disk``: a ``Dataset``, or a
  ``DatasetDict``, of which the ``train`` split is read when there is one and
  otherwise the first split in sorted order (to read another split, pass the
  split's sub-directory, e.g. ``corpus_dir/test``).

Every reader streams: a large file is never loaded whole (one line, one CSV record
or one row batch at a time). Documents that are empty or whitespace-only, and null
values in the structured formats, are skipped. Values of the structured formats are
yielded exactly as stored (not stripped). A corpus that yields no document at all
raises :class:`EmbgeomError` when its iteration finishes.

All problems with the input raise :class:`~embgeom.errors.EmbgeomError` with a
message that names the path (and line, row or field) and says how to fix it.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from .corpus_columns import _dataset_dir_kind, _read_datasets, _read_parquet
from .errors import EmbgeomError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ENCODING_ERRORS",
    "read_documents",
    "iter_documents",
    "corpus_format",
    "corpus_fingerprint",
]

#: file extension -> format name
SUPPORTED_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
#: accepted values of ``encoding_errors`` (Python codec error handlers)
ENCODING_ERRORS = ("strict", "replace", "ignore", "backslashreplace")

_DEFAULT_FIELD = "text"
_HASH_CHUNK = 1 << 20
_SUPPORTED_LIST = ".txt, .jsonl, .csv, .parquet, or a directory saved by datasets' save_to_disk"
_BOM = "\ufeff"


# --------------------------------------------------------------------------- format


def corpus_format(path: str | os.PathLike) -> str:
    """The corpus format of ``path``: ``txt``, ``jsonl``, ``csv``, ``parquet`` or ``datasets``.

    Raises EmbgeomError when the path does not exist, is a directory that ``datasets``
    did not write, or has an unsupported extension.
    """
    p = Path(path)
    if not p.exists():
        raise EmbgeomError(
            f"corpus {p} does not exist; check the path given to --corpus "
            f"(a {_SUPPORTED_LIST})"
        )
    if p.is_dir():
        if _dataset_dir_kind(p) is None:
            raise EmbgeomError(
                f"corpus directory {p} is not a dataset saved by datasets' save_to_disk "
                "(no dataset_dict.json, or state.json with dataset_info.json, inside); "
                f"pass a .txt, .jsonl, .csv or .parquet file, or the directory written by "
                "Dataset.save_to_disk / DatasetDict.save_to_disk"
            )
        return "datasets"
    if not p.is_file():  # a FIFO, socket or device: reading it could block forever
        raise EmbgeomError(
            f"corpus {p} is not a regular file (a named pipe, socket or device); embgeom reads the corpus "
            "more than once (to count, hash and stream it), so write it to a file and pass that"
        )
    fmt = SUPPORTED_EXTENSIONS.get(p.suffix.lower())
    if fmt is None:
        extra = ""
        if p.suffix.lower() in (".json", ".ndjson"):
            extra = " (for JSON, write one object per line and name the file .jsonl)"
        elif p.suffix.lower() in (".gz", ".bz2", ".xz", ".zst", ".zip"):
            extra = " (decompress the file first)"
        raise EmbgeomError(
            f"corpus {p} has an unsupported extension {p.suffix or '(none)'!r}; "
            f"supported: {_SUPPORTED_LIST}{extra}"
        )
    return fmt


# --------------------------------------------------------------------------- reading


def read_documents(
    path: str | os.PathLike,
    text_field: str | None = None,
    encoding_errors: str = "strict",
) -> Iterator[str]:
    """Yield the documents of the corpus at ``path``, in file order.

    ``text_field`` names the field/column holding the text for ``.jsonl``, ``.csv``,
    ``.parquet`` and ``datasets`` directories (default ``text``); it must be left
    unset (or ``"text"``) for ``.txt``. ``encoding_errors`` is the handler for bytes
    that are not valid UTF-8 in the text formats (``.txt``, ``.jsonl``, ``.csv``):
    ``strict`` (raise, naming line and byte offset), ``replace`` (U+FFFD),
    ``ignore`` (drop) or ``backslashreplace``.

    The path is checked when this is called; the file is opened and read lazily, as
    the iterator is consumed. When the iteration ends without having yielded a single
    non-blank document, EmbgeomError is raised.
    """
    if encoding_errors not in ENCODING_ERRORS:
        raise EmbgeomError(
            f"unknown encoding_errors {encoding_errors!r} for corpus {path}; "
            f"use one of {', '.join(ENCODING_ERRORS)} (--encoding-errors)"
        )
    if text_field is not None and (not isinstance(text_field, str) or not text_field):
        raise EmbgeomError(
            f"text_field must be a non-empty column name, got {text_field!r} for corpus {path}; "
            "pass --text-field NAME"
        )
    p = Path(path)
    fmt = corpus_format(p)
    if fmt == "txt" and text_field not in (None, _DEFAULT_FIELD):
        raise EmbgeomError(
            f"--text-field {text_field!r} does not apply to {p}: a .txt corpus holds one "
            "document per line; drop --text-field, or use a .jsonl/.csv/.parquet file"
        )
    if fmt != "datasets":
        _check_readable(p)
    field = text_field or _DEFAULT_FIELD
    if fmt == "txt":
        gen = _read_txt(p, encoding_errors)
    elif fmt == "jsonl":
        gen = _read_jsonl(p, field, encoding_errors)
    elif fmt == "csv":
        gen = _read_csv(p, field, encoding_errors)
    elif fmt == "parquet":
        gen = _read_parquet(p, field)
    else:
        gen = _read_datasets(p, field)
    return _nonempty(gen, p)


#: alias used by the pipeline (lazy iteration over a corpus path)
iter_documents = read_documents


def _nonempty(docs: Iterable[str], path: Path) -> Iterator[str]:
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if n == 0:
        raise EmbgeomError(
            f"corpus {path} has no non-blank document (it is empty, or every line/value is "
            "blank); pass a corpus with text in it"
        )


def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")


def _check_readable(path: Path) -> None:
    try:
        with _open_binary(path):
            pass
    except PermissionError as exc:
        raise EmbgeomError(
            f"cannot read corpus {path}: permission denied; make it readable "
            f"(chmod u+r {path}) or copy it somewhere you can read"
        ) from exc
    except OSError as exc:
        raise EmbgeomError(
            f"cannot read corpus {path}: {exc.strerror or exc}; check the file and the path "
            "given to --corpus"
        ) from exc


def _open_checked(path: Path) -> BinaryIO:
    try:
        return _open_binary(path)
    except PermissionError as exc:
        raise EmbgeomError(
            f"cannot read corpus {path}: permission denied; make it readable "
            f"(chmod u+r {path}) or copy it somewhere you can read"
        ) from exc
    except OSError as exc:
        raise EmbgeomError(f"cannot read corpus {path}: {exc.strerror or exc}") from exc


def _decoded_lines(path: Path, encoding_errors: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line with its terminator) for each line of a UTF-8 file.

    Reads one line at a time. A UTF-8 byte-order mark at the start is dropped. With
    ``strict`` errors, invalid UTF-8 raises EmbgeomError naming the line, the byte
    offset in the file and the column in the line.
    """
    with _open_checked(path) as fh:
        offset = 0
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except OSError as exc:
                raise EmbgeomError(f"cannot read corpus {path} at line {lineno + 1}: {exc}") from exc
            if not raw:
                return
            lineno += 1
            try:
                line = raw.decode("utf-8", errors=encoding_errors)
            except UnicodeDecodeError as exc:
                raise EmbgeomError(
                    f"corpus {path} is not valid UTF-8 at line {lineno}, byte offset "
                    f"{offset + exc.start} (byte {exc.start + 1} of the line: "
                    f"{raw[exc.start:exc.start + 1]!r}); re-encode the file as UTF-8, or pass "
                    "--encoding-errors replace (or ignore) to substitute (or drop) bad bytes"
                ) from None
            if lineno == 1 and line.startswith(_BOM):
                line = line[1:]
            offset += len(raw)
            yield lineno, line


def _read_txt(path: Path, encoding_errors: str) -> Iterator[str]:
    for _, line in _decoded_lines(path, encoding_errors):
        doc = line.strip()
        if doc:
            yield doc


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _short(text: str, limit: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_jsonl(path: Path, field: str, encoding_errors: str) -> Iterator[str]:
    for lineno, line in _decoded_lines(path, encoding_errors):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EmbgeomError(
                f"corpus {path} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}): "
                f"{_short(line)!r}; fix that line (each line of a .jsonl file must be one JSON object)"
            ) from None
        if not isinstance(obj, dict):
            raise EmbgeomError(
                f"corpus {path} line {lineno} is a JSON {_type_name(obj)}, not an object; each "
                f"line of a .jsonl corpus must be an object with a {field!r} field"
            )
        if field not in obj:
            keys = ", ".join(repr(k) for k in obj) or "none"
            raise EmbgeomError(
                f"corpus {path} line {lineno} has no field {field!r} (its keys: {keys}); "
                "pass --text-field with the key that holds the text"
            )
        value = obj[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise EmbgeomError(
                f"corpus {path} line {lineno}: field {field!r} is a JSON {_type_name(value)}, "
                "not a string; store the text as a string or choose another --text-field"
            )
        if value.strip():
            yield value


def _csv_field_limit() -> None:
    # Documents can be longer than csv's default 128 KiB field limit.
    limit = min(sys.maxsize, 2**31 - 1)
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def _read_csv(path: Path, field: str, encoding_errors: str) -> Iterator[str]:
    _csv_field_limit()
    lines = (line for _, line in _decoded_lines(path, encoding_errors))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            raise EmbgeomError(
                f"corpus {path} is empty: a .csv corpus needs a header row naming a "
                f"{field!r} column, then one document per row"
            )
        if field not in header:
            cols = ", ".join(repr(c) for c in header) or "none"
            raise EmbgeomError(
                f"corpus {path} has no column {field!r} in its header row (columns: {cols}); "
                "pass --text-field with the column that holds the text"
            )
        idx = header.index(field)
        for row in reader:
            if not row:  # blank line
                continue
            if idx >= len(row):
                raise EmbgeomError(
                    f"corpus {path} line {reader.line_num}: the row has {len(row)} field(s) but "
                    f"the header has {len(header)}, so column {field!r} is missing; fix that row"
                )
            value = row[idx]
            if value.strip():
                yield value
    except csv.Error as exc:
        raise EmbgeomError(
            f"corpus {path} is not valid CSV at line {reader.line_num}: {exc}; fix the quoting "
            "on that line"
        ) from None


# --------------------------------------------------------------------------- fingerprint


def _data_files(path: Path) -> list[Path]:
    """Regular files under a directory, sorted by their path relative to it (POSIX form)."""
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    with _open_checked(path) as fh:
        while True:
            chunk = fh.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)


def corpus_fingerprint(path: str | os.PathLike) -> dict:
    """A cheap identity of the corpus for ``run.json``.

    Returns ``{"path", "format", "size_bytes", "mtime", "sha256"}`` (plus ``n_files``
    for a directory): the resolved path, :func:`corpus_format`, the size in bytes,
    the last modification time (ISO 8601, UTC; for a directory the newest file), and
    the SHA-256 of the contents, streamed in 1 MiB chunks. For a directory the hash
    covers every regular file under it in sorted relative-path order, each file's
    relative path and length included, so renaming or moving data changes it.
    """
    p = Path(path)
    fmt = corpus_format(p)
    h = hashlib.sha256()
    if p.is_dir():
        files = _data_files(p)
        size = 0
        mtime = p.stat().st_mtime
        for f in files:
            st = f.stat()
            rel = f.relative_to(p).as_posix().encode("utf-8")
            h.update(len(rel).to_bytes(8, "little") + rel + st.st_size.to_bytes(8, "little"))
            _hash_file(h, f)
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
        extra = {"n_files": len(files)}
    else:
        st = p.stat()
        _hash_file(h, p)
        size, mtime, extra = st.st_size, st.st_mtime, {}
    return {
        "path": str(p.resolve()),
        "format": fmt,
        "size_bytes": int(size),
        "mtime": _dt.datetime.fromtimestamp(mtime, tz=_dt.timezone.utc).isoformat(),
        "sha256": h.hexdigest(),
        **extra,
    }

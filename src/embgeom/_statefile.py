"""A file format for accumulator states that cannot carry code.

Why not ``torch.save``: its files are pickles, and unpickling a file runs whatever
the file says; ``torch.load(weights_only=True)`` narrows the unpickler, but it is
still an unpickler, whose restrictions have been bypassed before (CVE-2025-32434).
A snapshot lives in an output directory that others may write to, so it is read
here by code that can only ever build tensors, numbers and strings.

The layout is that of safetensors (readable by the ``safetensors`` library too):
an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw little-endian tensor bytes. Everything that is
not a tensor (nested dicts, lists, strings, numbers, None) is one JSON document in
the header's ``__metadata__``, with tensors replaced by ``{"$tensor": name}``. A
SHA-256 of the JSON document, the tensor index and the tensor bytes is recorded
beside it, so a damaged or edited file is refused instead of read into different
numbers. Tensors are written straight from their memory (no copy of the state).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import numpy as np
import torch

FORMAT = "embgeom-state-1"
MAX_HEADER = 256 << 20  # the JSON part (tensors are not in it); far above any real state

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


class UnreadableState(Exception):
    """The file is not a state file of this format, or it is damaged."""


def _encode(obj, tensors: list):
    """`obj` as JSON-able data, tensors moved to `tensors` and replaced by references."""
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in _DTYPES:
            raise TypeError(f"cannot store a tensor of dtype {obj.dtype}")
        tensors.append(obj.detach().to("cpu").contiguous())
        return {"$tensor": str(len(tensors) - 1)}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or k.startswith("$"):
                raise TypeError(f"state dict keys must be strings not starting with '$', got {k!r}")
            out[k] = _encode(v, tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else {"$float": repr(v)}  # strict JSON has no NaN or inf
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(obj, tensors: dict):
    if isinstance(obj, dict):
        if "$tensor" in obj:
            name = obj["$tensor"]
            if len(obj) != 1 or name not in tensors:
                raise UnreadableState(f"it refers to a tensor {name!r} it does not hold")
            return tensors[name]
        if "$float" in obj:
            if len(obj) != 1 or obj["$float"] not in ("nan", "inf", "-inf"):
                raise UnreadableState("it holds a malformed number")
            return float(obj["$float"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a flat uint8 array (no copy)."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are what count
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)


def _canonical(document: str, index: dict) -> bytes:
    return json.dumps({"document": document, "tensors": index}, sort_keys=True, separators=(",", ":")).encode()


def write_state(fh, state) -> None:
    """Write `state` (nested dicts/lists of tensors, numpy arrays, numbers, strings,
    None) to the binary file handle `fh`."""
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise TypeError("state files are written on little-endian machines only")
    tensors: list = []
    document = json.dumps(_encode(state, tensors), sort_keys=True, separators=(",", ":"), allow_nan=False)
    # Widest elements first: every tensor then starts at a multiple of its own
    # element size, so the reader's views of the bytes are aligned.
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    index, offset = {}, 0
    for i in order:
        t = tensors[i]
        nbytes = t.numel() * t.element_size()
        index[str(i)] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    digest = hashlib.sha256(_canonical(document, index))
    for i in order:
        digest.update(_as_bytes(tensors[i]))
    header = dict(index, __metadata__={"format": FORMAT, "state": document, "sha256": digest.hexdigest()})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    fh.write(len(raw).to_bytes(8, "little"))
    fh.write(raw)
    for i in order:
        fh.write(_as_bytes(tensors[i]))


def _index(header: dict, data_len: int) -> dict:
    """Validated {name: (dtype, shape, start, end)}; the tensors tile the data exactly."""
    out, spans = {}, []
    for name, e in header.items():
        try:
            dtype = _FROM_NAME[e["dtype"]]
            shape = [int(s) for s in e["shape"]]
            start, end = (int(v) for v in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UnreadableState(f"its tensor index is malformed at {name!r}") from None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if any(s < 0 for s in shape) or end - start != math.prod(shape) * itemsize or start < 0:
            raise UnreadableState(f"tensor {name!r} has a shape that does not match its bytes")
        out[name] = (dtype, shape, start, end)
        spans.append((start, end))
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise UnreadableState("its tensors overlap or leave gaps")
        pos = end
    if pos != data_len:
        raise UnreadableState(f"it holds {data_len} bytes of tensor data where its index names {pos}")
    return out


def read_state(path):
    """The state written by `write_state` to `path`. Raises UnreadableState (with
    what is wrong) for a file of another kind, a truncated or edited one."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise UnreadableState("it is truncated")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise UnreadableState("it is not a state file (its header length is impossible)")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
            meta = header.pop("__metadata__")
            ok = isinstance(meta, dict) and meta.get("format") == FORMAT
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
            raise UnreadableState("it is not a state file (its header is not readable)") from None
        if not ok:
            raise UnreadableState("it is not a state file of this embgeom (unknown format)")
        document, recorded = meta.get("state"), meta.get("sha256")
        if not isinstance(document, str) or not isinstance(recorded, str):
            raise UnreadableState("its header lacks the state or its checksum")
        data_len = size - 8 - n
        index = _index(header, data_len)
        buf = bytearray(data_len)
        if fh.readinto(buf) != data_len:
            raise UnreadableState("it is truncated")
    digest = hashlib.sha256(_canonical(document, header))
    digest.update(buf)
    if digest.hexdigest() != recorded:
        raise UnreadableState("its checksum does not match its contents: the file was damaged or edited")
    tensors = {}
    for name, (dtype, shape, start, end) in index.items():
        count = math.prod(shape)
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=start) if count else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(shape)
    try:
        return _decode(json.loads(document), tensors)
    except ValueError:
        raise UnreadableState("its state document is not valid JSON") from None

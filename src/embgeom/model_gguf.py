"""GGUF files: dequantized once into an fp32 Hugging Face copy kept in embgeom's cache."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import EmbgeomError


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where embgeom keeps derived files (fp32 copies of GGUF models)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("EMBGEOM_CACHE"):
        return Path(os.environ["EMBGEOM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embgeom"


def _gguf_cache_dir(path: Path, cache_dir) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{path.stem}-{key}"


def gguf_fp32_copy(path: Path, cache_dir=None, progress=None) -> Path:
    """Dequantize a GGUF file once and keep an fp32 Hugging Face copy under the cache.

    A GGUF-loaded model refuses `save_pretrained`, so the copy is rebuilt from its
    config without `quantization_config` and given the dequantized state dict.
    """
    from transformers import AutoModel, AutoTokenizer

    target = _gguf_cache_dir(path, cache_dir)
    if (target / "config.json").exists():
        return target
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise EmbgeomError(f"{path} is not a GGUF file (its first bytes are not 'GGUF'); pass a .gguf model file")
    if progress:
        progress(f"dequantizing {path.name} once (cached in {target})")
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModel.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as exc:
        raise EmbgeomError(f"loading {path} needs the `gguf` package: pip install gguf ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - gguf/transformers raise many kinds
        raise EmbgeomError(f"could not read GGUF file {path}: {type(exc).__name__}: {exc}") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModel.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise EmbgeomError(f"GGUF file {path}: rebuilding the fp32 model left weights unmatched ({missing[:3]} {unexpected[:3]})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written copy is never used
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


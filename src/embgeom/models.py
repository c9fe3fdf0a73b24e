"""Load models (local directory, GGUF file, Hub id) and read facts about their architecture.

Finding and loading live here; the facts measured on a loaded model are in
``model_facts`` and GGUF dequantization in ``model_gguf``, re-exported below so that
``embgeom.models`` stays the one place callers import from.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ._names import display_name
from .errors import EmbgeomError, option
from .model_facts import ModelFacts, _max_length, inspect_model, special_template
from .model_gguf import cache_root, gguf_fp32_copy

__all__ = ["DTYPES", "LoadedModel", "ModelFacts", "OpenedModel", "TOKENIZER_FILES", "cache_root",
           "gguf_fp32_copy", "inspect_model", "load_model", "open_model", "resolve_device", "resolve_dtype",
           "special_template"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    facts: ModelFacts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# --------------------------------------------------------------------------- options
def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmbgeomError(f"{option('device', device)} was asked for but no CUDA GPU is visible; "
                           f"use {option('device', 'cpu')} or auto")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise EmbgeomError(f"unknown {option('device')} {device!r}; use auto, cpu, cuda or cuda:N") from None


def resolve_dtype(dtype: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EmbgeomError(f"unknown {option('dtype')} {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------- loading
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass


@contextmanager
def _loading_bars(enabled: bool):
    """transformers' own progress bars (weights loaded, shards) while a model loads,
    when the caller shows progress: a large model takes minutes to load."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        yield
    finally:
        hf_logging.disable_progress_bar()


def _hub_kw(kw: dict) -> dict:
    if os.environ.get("HF_HUB_CACHE") and "cache_dir" not in kw:
        # Read at call time, so a cache chosen after import is honoured.
        kw = {**kw, "cache_dir": os.environ["HF_HUB_CACHE"]}
    return kw


def _tokenizer_and_config(location, revision=None, local_files_only=False):
    from transformers import AutoConfig, AutoTokenizer

    kw = _hub_kw({})
    tok = AutoTokenizer.from_pretrained(location, revision=revision, local_files_only=local_files_only, **kw)
    config = AutoConfig.from_pretrained(location, revision=revision, local_files_only=local_files_only, **kw)
    return tok, config


def _model_from(location, revision=None, dtype=torch.float32, local_files_only=False, **kw):
    from transformers import AutoModel

    return AutoModel.from_pretrained(location, revision=revision, local_files_only=local_files_only, dtype=dtype,
                                     **_hub_kw(kw))


# Files any Hugging Face tokenizer is loaded from; a model directory without one of
# them cannot turn text into ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def load_model(
    spec: str,
    revision: str | None = None,
    dtype="float32",
    device="auto",
    cache_dir=None,
    device_map: str | None = None,
    progress=None,
) -> LoadedModel:
    """Load MODEL: a local Hugging Face directory, a `.gguf` file, or a Hub id.

    Hub ids are looked up in the local Hugging Face cache first (no network needed),
    at `revision` when given. `progress`: True (or a callable taking a message) shows
    what loading is doing: a note before a GGUF file is dequantized, and
    transformers' weight-loading bars. Equals ``open_model(...).load(...)``.
    """
    opened = open_model(spec, revision=revision, cache_dir=cache_dir, progress=progress)
    return opened.load(dtype=dtype, device=device, device_map=device_map, progress=progress)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress_callback(progress):
    return _note if progress is True else (progress or None)


@dataclass
class OpenedModel:
    """MODEL found and its tokenizer and config read, its weights not loaded yet
    (``load``): enough to read, tokenize and count the corpus first, so that bad
    input is reported before a large model spends minutes loading."""

    spec: str
    revision: str | None
    source: str  # directory | gguf | hub
    location: object  # the directory (a GGUF file's fp32 copy) or the Hub id
    tokenizer: object
    config: object
    hub_local: bool = True  # a Hub id found in the local cache (else: downloaded)

    @property
    def name(self) -> str:
        return display_name(self.spec)

    @property
    def special_prefix_suffix(self) -> tuple[list[int], list[int]]:
        return special_template(self.tokenizer)

    @property
    def max_length(self) -> int | None:
        return _max_length(self.config, self.tokenizer)

    @property
    def shape(self) -> tuple[dict, int] | None:
        """({stack: blocks}, width) as the config states them, for sizing the
        statistics before the weights load (the loaded model's measured facts are
        final); None where the config does not say."""
        cfg = self.config
        try:
            width = int(cfg.hidden_size)
            if getattr(cfg, "is_encoder_decoder", False):
                enc = int(getattr(cfg, "encoder_layers", None) or getattr(cfg, "num_layers", None) or cfg.num_hidden_layers)
                dec = int(getattr(cfg, "decoder_layers", None) or getattr(cfg, "num_decoder_layers", None) or enc)
                return {"encoder": enc, "decoder": dec}, width
            return {"stack": int(cfg.num_hidden_layers)}, width
        except (AttributeError, TypeError, ValueError):
            return None

    def load(self, dtype="float32", device="auto", device_map: str | None = None, progress=None) -> LoadedModel:
        """Load the weights, move them to `device` (or spread them by `device_map`) and
        measure the model's facts."""
        torch_dtype = resolve_dtype(dtype)
        dev = resolve_device(device)
        kw = {"device_map": device_map} if device_map else {}
        with _loading_bars(bool(progress)):
            if self.source == "hub":
                model = self._hub_weights(torch_dtype, kw)
            else:
                try:
                    model = _model_from(self.location, None, torch_dtype, True, **kw)
                except Exception as exc:  # noqa: BLE001
                    raise EmbgeomError(_load_failure(str(self.spec), exc)) from None
        if not device_map:
            model = model.to(dev)
        model.eval()
        facts = inspect_model(model, self.tokenizer, source=self.source, path=str(self.spec), revision=self.revision)
        return LoadedModel(model=model, tokenizer=self.tokenizer, name=self.name, facts=facts)

    def _hub_weights(self, torch_dtype, kw):
        """From the local cache first, then (where the Hub answers) the network."""
        if self.hub_local:
            try:
                return _model_from(str(self.spec), self.revision, torch_dtype, True, **kw)
            except Exception:  # noqa: BLE001 - weights not cached although the tokenizer is
                if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
                    raise EmbgeomError(_hub_missing(self.spec, self.revision)) from None
        try:
            return _model_from(str(self.spec), self.revision, torch_dtype, False, **kw)
        except Exception as exc:  # noqa: BLE001
            raise EmbgeomError(_hub_missing(self.spec, self.revision) + f" ({type(exc).__name__})") from None


def open_model(spec: str, revision: str | None = None, cache_dir=None, progress=None) -> OpenedModel:
    """Find MODEL (see ``load_model``) and read its tokenizer and config; a GGUF file
    is dequantized here, once. Every problem with the path, the tokenizer or the
    Hub cache is raised here; the weights' own problems by ``OpenedModel.load``."""
    _quiet_transformers()
    progress = _progress_callback(progress)
    path = Path(os.path.expanduser(str(spec)))
    if path.exists() and revision is not None:
        raise EmbgeomError(
            f"{option('revision', revision)} names a Hub revision, but {path} is a local "
            f"{'directory' if path.is_dir() else 'file'}, which has none; drop {option('revision')} (to compare "
            "checkpoints, name their folders, or a training directory holding checkpoint-N folders)"
        )
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").exists():
                raise EmbgeomError(f"model directory {path} has no config.json; pass a Hugging Face model directory")
            source, location = "directory", path
            if not any((path / f).exists() for f in TOKENIZER_FILES):
                raise EmbgeomError(
                    f"model {path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                    "save the tokenizer next to the model (tokenizer.save_pretrained(PATH))"
                )
        elif path.suffix.lower() == ".gguf":
            with _loading_bars(bool(progress)):
                source, location = "gguf", gguf_fp32_copy(path, cache_dir, progress)
        else:
            raise EmbgeomError(f"model {path} is a file but not a .gguf file; pass a model directory, a .gguf file or a Hub id")
        if not os.access(path, os.R_OK):
            raise EmbgeomError(f"model {path} is not readable (permissions)")
        try:
            tok, config = _tokenizer_and_config(location, None, True)
        except Exception as exc:  # noqa: BLE001
            raise EmbgeomError(_load_failure(str(path), exc)) from None
        _check_depth(config, path)
        return OpenedModel(str(spec), revision, source, location, tok, config)
    if str(spec).endswith(".gguf") or str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise EmbgeomError(f"model {spec} does not exist; pass a model directory, a .gguf file or a Hub id")
    try:
        tok, config = _tokenizer_and_config(str(spec), revision, True)
        local = True
    except Exception:  # noqa: BLE001 - not in the local cache: try the network
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
            raise EmbgeomError(_hub_missing(spec, revision)) from None
        try:
            tok, config = _tokenizer_and_config(str(spec), revision, False)
            local = False
        except Exception as exc:  # noqa: BLE001
            raise EmbgeomError(_hub_missing(spec, revision) + f" ({type(exc).__name__})") from None
    _check_depth(config, spec)
    return OpenedModel(str(spec), revision, "hub", str(spec), tok, config, hub_local=local)


def _check_depth(config, where) -> None:
    """Refuse a config whose stacks have no block (n_layer ≤ 0): there is nothing to
    measure, and the model code fails on it with an index error."""
    names = ("num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers", "num_decoder_layers")
    for name in names:
        try:
            value = getattr(config, name, None)
        except Exception:  # noqa: BLE001 - a config that computes the attribute and fails
            value = None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise EmbgeomError(f"model {where}: its config gives {name} = {value} (transformer blocks); a model "
                               "needs at least one: fix config.json (n_layer / num_hidden_layers)")



def _load_failure(where: str, exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "tokenizer" in text.lower() or isinstance(exc, (TypeError,)) and "tokenizer" in repr(exc).lower():
        return f"model {where}: no usable tokenizer ({text}); save the tokenizer next to the model"
    return f"could not load model {where}: {type(exc).__name__}: {text[:300]}"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the Hub, so an offline machine fails at once instead of
    after the client's retries."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
    except Exception:  # noqa: BLE001
        url = urlparse("https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_missing(spec, revision) -> str:
    rev = f" at revision {revision}" if revision else ""
    return (
        f"model {spec}{rev} is neither a local path nor in the Hugging Face cache, and it could not be "
        "downloaded; check the path or name, or download it first (huggingface-cli download) where there is a network"
    )

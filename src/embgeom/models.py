"""Load models (local directory, GGUF file, Hub id) and read facts about their architecture.

Facts are measured on the loaded model, not guessed from its name: causality by
perturbing the last token of a probe input, norm placement by the order in which the
first block calls its sub-modules.
"""
from __future__ import annotations

import hashlib
import os
import sys
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._names import display_name
from .errors import EmbgeomError, option

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelFacts:
    """What run.json records about a model."""

    source: str  # directory | gguf | hub | object
    path: str
    revision: str | None
    architecture: str
    model_type: str
    kind: str  # encoder | decoder | encoder-decoder
    n_layers: dict  # stack -> number of blocks (hidden states = n_layers + 1)
    width: int  # of the hidden states (the most common one, where they differ)
    norm_placement: str  # pre-LN | post-LN | sandwich | none
    max_length: int | None
    dtype: str
    n_parameters: int
    special_prefix: list = field(default_factory=list)
    special_suffix: list = field(default_factory=list)
    # {stack: width of each hidden state}, only where they differ (OPT-350m projects
    # its last hidden state to the embedding width); None otherwise.
    layer_widths: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def widths(self):
        """What the accumulators are sized by: the width, or the per-layer widths."""
        return self.layer_widths or self.width


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


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where embgeom keeps derived files (fp32 copies of GGUF models)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("EMBGEOM_CACHE"):
        return Path(os.environ["EMBGEOM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embgeom"


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


def _declared_causal(model) -> bool:
    """Whether the model says it is causal (a decoder): its config's is_decoder, or a
    class made for causal language modelling (…ForCausalLM, GPT-2's …LMHeadModel)."""
    cfg = getattr(model, "config", None)
    names = [type(model).__name__, *(getattr(cfg, "architectures", None) or [])]
    return bool(getattr(cfg, "is_decoder", False)) or any(
        n.endswith(("ForCausalLM", "LMHeadModel")) and "Masked" not in n for n in names)


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


# --------------------------------------------------------------------------- facts
def special_template(tokenizer) -> tuple[list[int], list[int]]:
    """Special tokens the tokenizer puts before and after one sequence.

    Found by tokenizing a probe with and without special tokens, since tokenizers
    apply this template in their post-processor and expose no public hook for ids.
    """
    for probe in ("hello world", "the", "a b c", "x"):
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        if not plain:
            continue
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def _max_length(cfg, tokenizer) -> int | None:
    limits = []
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            limits.append(v)
    if not limits:  # relative positions (T5): the tokenizer's documented limit, if any
        v = getattr(tokenizer, "model_max_length", None)
        if isinstance(v, int) and 0 < v < 1_000_000:
            limits.append(v)
    # BERT-like models reserve padding_idx + 1 positions in some families (RoBERTa, MPNet).
    if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "mpnet") and limits:
        limits = [min(limits) - 2]
    return min(limits) if limits else None


def _probe_ids(tokenizer, n: int = 8) -> list[int]:
    ids = tokenizer("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    ids = (ids * n)[:n]
    return ids if len(ids) == n else list(range(5, 5 + n))


def _block_lists(model, n_layers: int):
    return [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def _skippable(module) -> bool:
    name = type(module).__name__.lower()
    return "dropout" in name or name == "identity" or "act" in name or "rotary" in name


def inspect_model(model, tokenizer, source="object", path="", revision=None) -> ModelFacts:
    """Measure the facts run.json records, with two tiny forward passes."""
    from .extract import forward_hidden

    is_ed = bool(getattr(model.config, "is_encoder_decoder", False))
    prefix, suffix = special_template(tokenizer)
    dev = next(model.parameters()).device
    ids = torch.tensor([prefix + _probe_ids(tokenizer) + suffix], device=dev)
    mask = torch.ones_like(ids)

    # Record the order in which leaf modules of the first block run.
    order: list = []
    hidden = None
    first_stack_layers = None
    with torch.no_grad():
        hidden = forward_hidden(model, ids, mask, is_ed)
        first_stack_layers = len(next(iter(hidden.values()))) - 1
        blocks = _block_lists(model, first_stack_layers)
        hooks = []
        if blocks:
            for leaf in blocks[0][0].modules():
                if not list(leaf.children()) and not _skippable(leaf):
                    hooks.append(leaf.register_forward_pre_hook(lambda m, a: order.append(m)))
        try:
            forward_hidden(model, ids, mask, is_ed)
        finally:
            for h in hooks:
                h.remove()
        if is_ed:
            kind = "encoder-decoder"
        else:
            changed = ids.clone()
            changed[0, -1 - len(suffix)] = (int(changed[0, -1 - len(suffix)]) + 1) % model.config.vocab_size
            other = forward_hidden(model, changed, mask, is_ed)
            h0, h1 = next(iter(hidden.values()))[-1], next(iter(other.values()))[-1]
            if bool(torch.isfinite(h0[0, 0]).all()) and bool(torch.isfinite(h1[0, 0]).all()):
                kind = "decoder" if torch.allclose(h0[0, 0], h1[0, 0], rtol=1e-4, atol=1e-5) else "encoder"
            else:  # NaN compares unequal: the measurement says nothing; the model's own flags do
                kind = "decoder" if _declared_causal(model) else "encoder"
    # Dedupe while keeping order: a module called twice (shared norms) counts once.
    seen, calls = set(), []
    for m in order:
        if id(m) not in seen:
            seen.add(id(m))
            calls.append(m)
    if calls:
        first, last = _is_norm(calls[0]), _is_norm(calls[-1])
        placement = {(True, False): "pre-LN", (False, True): "post-LN", (True, True): "sandwich"}.get(
            (first, last), "none"
        )
    else:
        placement = "unknown"
    if kind == "encoder-decoder":
        n_layers = {stack: len(h) - 1 for stack, h in hidden.items()}
    else:
        n_layers = {kind: first_stack_layers}
    per_layer = {stack: [int(h.shape[-1]) for h in hs] for stack, hs in zip(n_layers, hidden.values())}
    every = [w for ws in per_layer.values() for w in ws]
    width = max(set(every), key=every.count)
    layer_widths = per_layer if len(set(every)) > 1 else None
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    return ModelFacts(
        source=source,
        path=str(path),
        revision=revision,
        architecture=arch,
        model_type=str(getattr(model.config, "model_type", "")),
        kind=kind,
        n_layers=n_layers,
        width=width,
        norm_placement=placement,
        max_length=_max_length(model.config, tokenizer),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        n_parameters=int(sum(p.numel() for p in model.parameters())),
        special_prefix=prefix,
        special_suffix=suffix,
        layer_widths=layer_widths,
    )

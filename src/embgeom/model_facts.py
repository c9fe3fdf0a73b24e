"""Facts about a loaded model's architecture, measured on the model rather than
guessed from its name: causality by perturbing the last token of a probe input,
norm placement by the order in which the first block calls its sub-modules.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


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


def _declared_causal(model) -> bool:
    """Whether the model says it is causal (a decoder): its config's is_decoder, or a
    class made for causal language modelling (…ForCausalLM, GPT-2's …LMHeadModel)."""
    cfg = getattr(model, "config", None)
    names = [type(model).__name__, *(getattr(cfg, "architectures", None) or [])]
    return bool(getattr(cfg, "is_decoder", False)) or any(
        n.endswith(("ForCausalLM", "LMHeadModel")) and "Masked" not in n for n in names)


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

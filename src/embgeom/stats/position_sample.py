"""A uniform random sample of token positions, the same for every layer.

The sample-based statistics (intrinsic dimension) are computed on a uniform
random sample of the counted token positions of the whole stream, the same positions
in every layer, reproducible from the seed and mergeable across shards.

Method: *bottom-k sampling by hashed priorities.* Every counted token carries a unique
integer key; a seeded 64-bit hash (splitmix64) turns the key into a pseudo-random
priority, and the sample is the ``size`` tokens with the smallest priorities (ties,
which need equal 64-bit hashes, broken by the smaller key). Because a token's priority
depends only on its key and the seed:

- the sample does not depend on batch sizes, on the order of the batches, or on how
  the stream is split across processes: the bottom-k of a union is the bottom-k of the
  union of the parts' bottom-k, so :meth:`PositionSample.merge` is exact;
- it is a uniform sample without replacement (every set of ``size`` tokens equally
  likely, as far as the hash is random), and a different seed gives an independent
  sample;
- it is the same positions for every layer (one key, one priority, all layers).

With ``order="first"`` the priority is the key itself: the sample is the ``size``
tokens with the smallest keys, i.e. the first ``size`` counted tokens of the stream
(with the pipeline's keys), as paper A's protocol takes them; it merges exactly the
same way.

Keys. The caller packs each counted token's identity into an int64 that is unique in
the whole stream; the recommended packing is :func:`pack_position_keys`:
``key = document_index · 2³² + token_offset_in_document`` (document index < 2³¹,
offset < 2³²). Keys must not depend on batching or windowing (use the offset in the
document, not in the window), so that every run over the same corpus draws the same
tokens. A key reaching the sample twice is an error (tokens counted twice).

Cost. Hashing is vectorised (numpy uint64, whose arithmetic wraps modulo 2⁶⁴ by
definition). Once the sample is full, only tokens whose priority beats the current
threshold — about ``size · n / N`` of a batch of ``n`` after ``N`` tokens — are copied,
so the steady-state cost is one hash per token. Vectors are stored as float32 on the
CPU: ``size × n_layers × dim × 4`` bytes (10 000 × 31 × 576 × 4 ≈ 714 MB for
SmolLM2-135M; halve ``size`` to halve it), plus 8 bytes per stored token for the key
and for each metadata field.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EmbgeomError
from . import _state
from .position_keys import _as_keys, _order, pack_position_keys, position_priorities

__all__ = ["PositionSample", "pack_position_keys", "position_priorities"]

_STATE_VERSION = 1


class PositionSample:
    """Bottom-k sample of token positions with their hidden vectors in every layer.

    Parameters
    ----------
    size : number of positions to keep (``--id-sample``, default 10 000 in the CLI).
    n_layers : number of layers stored per position (e.g. ``L + 1`` hidden states).
    dim : width of the hidden vectors, or a sequence of ``n_layers`` widths for a
        model whose hidden states differ in width (OPT-350m projects its last one).
    seed : sampling seed (``--seed``); any integer, used modulo 2⁶⁴.
    order : "random" (the seeded hash priorities) or "first" (the smallest keys: the
        first ``size`` tokens in key order; the seed is then unused).

    The accessors (:attr:`keys`, :meth:`layer`, :meth:`metadata`) return the sampled
    positions **sorted by key** (stream order with the recommended packing).
    """

    def __init__(self, size: int, n_layers: int, dim, seed: int = 0, order: str = "random"):
        dims = tuple(dim) if isinstance(dim, (list, tuple)) else None
        for nm, v in (("size", size), ("n_layers", n_layers), *((("dim", d) for d in dims) if dims else [("dim", dim)])):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise EmbgeomError(f"{nm} must be a positive integer, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise EmbgeomError(f"seed must be an integer, got {seed!r}")
        if order not in ("random", "first"):
            raise EmbgeomError(f"order must be 'random' or 'first', got {order!r}")
        self.order = order
        if dims is not None and len(dims) != n_layers:
            raise EmbgeomError(f"dim must be one width or n_layers={n_layers} widths, got {len(dims)}: {list(dims)}")
        self.size, self.n_layers, self.seed = int(size), int(n_layers), int(seed)
        # Per-layer widths; `dim` is the one width, or the list where they differ.
        self.dims = tuple(int(d) for d in dims) if dims else (int(dim),) * self.n_layers
        self.dim = self.dims[0] if len(set(self.dims)) == 1 else list(self.dims)
        self._keys = np.empty(self.size, dtype=np.int64)
        self._prio = np.empty(self.size, dtype=np.int64)
        # Narrower layers use the first columns of the widest one's slots.
        self._vec = torch.empty((self.n_layers, self.size, max(self.dims)), dtype=torch.float32)
        self._meta_names: tuple[str, ...] | None = None  # fixed by the first update
        self._meta: dict[str, np.ndarray] = {}
        self._m = 0  # entries stored, in slots [0, m)
        self.n_seen = 0  # tokens offered, over all updates and merges
        self._sorted: np.ndarray | None = None  # slot order by key
        self._worst: tuple[int, int] | None = None  # (priority, key) of the worst kept entry

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return self._m

    def __repr__(self) -> str:
        return (
            f"PositionSample(size={self.size}, n_layers={self.n_layers}, dim={self.dim}, "
            f"seed={self.seed}, order={self.order!r}, stored={self._m}, seen={self.n_seen})"
        )

    @property
    def nbytes(self) -> int:
        """Memory of the vector store: size × n_layers × dim × 4 bytes (the widest
        layer's dim where they differ)."""
        return self.nbytes_for(self.size, self.n_layers, self.dim)

    @staticmethod
    def nbytes_for(size: int, n_layers: int, dim) -> int:
        return size * n_layers * (max(dim) if isinstance(dim, (list, tuple)) else dim) * 4

    @property
    def metadata_names(self) -> tuple[str, ...]:
        """Names of the metadata fields carried along (sorted)."""
        return self._meta_names or ()

    def _sort_order(self) -> np.ndarray:
        if self._sorted is None:
            self._sorted = np.argsort(self._keys[: self._m], kind="stable")
        return self._sorted

    @property
    def keys(self) -> np.ndarray:
        """(m,) int64 keys of the sampled positions, ascending."""
        return self._keys[: self._m][self._sort_order()]

    @property
    def priorities(self) -> np.ndarray:
        """(m,) int64 priorities of the sampled positions, in the order of :attr:`keys`."""
        return self._prio[: self._m][self._sort_order()]

    def layer(self, l: int) -> np.ndarray:
        """(m, dim) float32 vectors of layer ``l`` at the sampled positions, in the
        order of :attr:`keys` (a new array)."""
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)) or not (-self.n_layers <= l < self.n_layers):
            raise EmbgeomError(f"layer index must be an integer in [0, {self.n_layers}), got {l!r}")
        order = torch.from_numpy(self._sort_order())
        return self._slots(int(l)).index_select(0, order).numpy()

    def _slots(self, l: int) -> torch.Tensor:
        """(size, width of layer l) view of layer l's stored vectors."""
        return self._vec[l, :, : self.dims[l]]

    def metadata(self, name: str) -> np.ndarray:
        """(m,) int64 metadata field ``name`` at the sampled positions (order of :attr:`keys`)."""
        if name not in self._meta:
            raise EmbgeomError(f"no metadata field {name!r}; fields: {list(self.metadata_names)}")
        return self._meta[name][: self._m][self._sort_order()]

    # ------------------------------------------------------------------ update
    def _fix_meta(self, names: tuple[str, ...], where: str):
        names = tuple(sorted(names))
        if self._meta_names is None:
            self._meta_names = names
            self._meta = {nm: np.empty(self.size, dtype=np.int64) for nm in names}
        elif names != self._meta_names:
            raise EmbgeomError(
                f"{where}: metadata fields {list(names)} differ from the earlier {list(self._meta_names)}; "
                f"pass the same fields in every update"
            )

    def _vectors_layers(self, vectors, n: int):
        """Validate ``vectors``; return a function layer l -> (n, dim) tensor."""
        if isinstance(vectors, np.ndarray):
            vectors = torch.from_numpy(vectors)
        if isinstance(vectors, torch.Tensor):
            if isinstance(self.dim, list):
                raise EmbgeomError(f"vectors must be a list of n_layers={self.n_layers} (n, dim) arrays: "
                                   f"the layers' widths differ ({self.dim})")
            if vectors.ndim != 3 or tuple(vectors.shape) != (self.n_layers, n, self.dim):
                raise EmbgeomError(
                    f"vectors must have shape (n_layers={self.n_layers}, n={n}, dim={self.dim}), "
                    f"got {tuple(vectors.shape)}"
                )
            if not vectors.is_floating_point():
                raise EmbgeomError(f"vectors must be floating point, got dtype {vectors.dtype}")
            return lambda l: vectors[l]
        if isinstance(vectors, (list, tuple)):
            if len(vectors) != self.n_layers:
                raise EmbgeomError(
                    f"vectors must be a list of n_layers={self.n_layers} (n, dim) arrays, got {len(vectors)}"
                )
            vs = [torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in vectors]
            for l, v in enumerate(vs):
                if not isinstance(v, torch.Tensor) or v.ndim != 2 or tuple(v.shape) != (n, self.dims[l]):
                    shape = tuple(v.shape) if hasattr(v, "shape") else type(v).__name__
                    raise EmbgeomError(f"vectors[{l}] must have shape (n={n}, dim={self.dims[l]}), got {shape}")
                if not v.is_floating_point():
                    raise EmbgeomError(f"vectors[{l}] must be floating point, got dtype {v.dtype}")
            return lambda l: vs[l]
        raise EmbgeomError(
            f"vectors must be a (n_layers, n, dim) tensor or a list of n_layers (n, dim) tensors, "
            f"got {type(vectors).__name__}"
        )

    def update(self, keys, vectors, metadata: dict | None = None) -> "PositionSample":
        """Offer ``n`` counted tokens.

        Parameters
        ----------
        keys : (n,) int64 unique keys (see :func:`pack_position_keys`); numpy or torch.
        vectors : (n_layers, n, dim) tensor, or a list of ``n_layers`` (n, dim) tensors
            (any float dtype, any device); only the tokens that enter the sample are
            indexed, converted to float32 and copied to the CPU.
        metadata : optional dict name → (n,) integer array/tensor carried along with the
            sampled tokens (e.g. ``{"token_id": ..., "position": ...}``); the same names in
            every update.

        Returns ``self``.
        """
        k = _as_keys(keys)
        n = k.shape[0]
        layer_of = self._vectors_layers(vectors, n)
        meta_in = {}
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise EmbgeomError(f"metadata must be a dict of name -> (n,) integer arrays, got {type(metadata).__name__}")
            for nm, v in metadata.items():
                a = _as_keys(v)
                if a.shape[0] != n:
                    raise EmbgeomError(f"metadata[{nm!r}] must have n={n} entries, got {a.shape[0]}")
                meta_in[str(nm)] = a
        self._fix_meta(tuple(meta_in), "update")
        self.n_seen += n
        if n == 0:
            return self
        prio = self._priorities(k)
        # Only tokens that beat the current worst kept one (when full) can enter.
        if self._m == self.size:
            tp, tk = self._worst_entry()
            cand = np.nonzero((prio < tp) | ((prio == tp) & (k < tk)))[0]
            if cand.size == 0:
                return self
        else:
            cand = np.arange(n)
        if cand.size > self.size:  # keep at most `size` of them before copying anything
            cand = cand[_order(prio[cand], k[cand])[: self.size]]

        def fetch(l, sel):
            idx = torch.from_numpy(cand[sel])
            v = layer_of(l)
            return v.index_select(0, idx.to(v.device)).to("cpu", torch.float32)

        self._insert(k[cand], prio[cand], fetch, {nm: a[cand] for nm, a in meta_in.items()})
        return self

    def _priorities(self, keys: np.ndarray) -> np.ndarray:
        return keys.copy() if self.order == "first" else position_priorities(keys, self.seed)

    def _worst_entry(self) -> tuple[int, int]:
        if self._worst is None:
            w = _order(self._prio[: self._m], self._keys[: self._m])[-1]
            self._worst = (int(self._prio[w]), int(self._keys[w]))
        return self._worst

    def _insert(self, keys, prio, fetch, meta):
        """Merge candidate entries into the sample: the stored set becomes the bottom
        ``size`` of (stored ∪ candidates) by (priority, key). ``fetch(l, sel)`` returns
        the float32 CPU vectors of layer ``l`` for the candidates ``sel``."""
        m = self._m
        all_k = np.concatenate([self._keys[:m], keys])
        sk = np.sort(all_k)
        if sk.size > 1 and (sk[1:] == sk[:-1]).any():
            dup = int(sk[1:][sk[1:] == sk[:-1]][0])
            raise EmbgeomError(
                f"key {dup} was offered twice; every counted token needs a unique key "
                f"(e.g. pack_position_keys(document_index, offset_in_document))"
            )
        order = _order(np.concatenate([self._prio[:m], prio]), all_k)
        keep = order[: self.size]
        new_sel = np.sort(keep[keep >= m] - m)  # candidates that enter
        if new_sel.size == 0:
            return
        kept_old = np.zeros(m, dtype=bool)
        kept_old[keep[keep < m]] = True
        # Slots for the entering entries: the evicted ones, then the unused tail. For a
        # bottom-k there are never fewer entering than evicted, so [0, m_new) stays full.
        slots = np.concatenate([np.nonzero(~kept_old)[0], np.arange(m, self.size)])[: new_sel.size]
        self._keys[slots] = keys[new_sel]
        self._prio[slots] = prio[new_sel]
        for nm, a in meta.items():
            self._meta[nm][slots] = a[new_sel]
        ts = torch.from_numpy(slots.astype(np.int64))
        for l in range(self.n_layers):
            self._slots(l).index_copy_(0, ts, fetch(l, new_sel))
        self._m = min(self.size, m + keys.shape[0])
        self._sorted = None
        self._worst = None

    # ------------------------------------------------------------------ merge
    def merge(self, other: "PositionSample") -> "PositionSample":
        """Merge another sample (e.g. another shard's) into this one, in place; the
        result equals the sample of the concatenated streams. Returns ``self``."""
        if not isinstance(other, PositionSample):
            raise EmbgeomError(f"can only merge another PositionSample, got {type(other).__name__}")
        if other is self:
            raise EmbgeomError("cannot merge a PositionSample with itself")
        for nm in ("size", "n_layers", "dim", "seed", "order"):
            if getattr(self, nm) != getattr(other, nm):
                raise EmbgeomError(
                    f"cannot merge samples with different {nm}: {getattr(self, nm)} vs {getattr(other, nm)}"
                )
        if other._meta_names is not None:
            self._fix_meta(other._meta_names, "merge")
        om = other._m
        if om:

            def fetch(l, sel):
                return other._slots(l).index_select(0, torch.from_numpy(sel.astype(np.int64)))

            meta = {nm: other._meta[nm][:om] for nm in other.metadata_names}
            self._insert(other._keys[:om].copy(), other._prio[:om].copy(), fetch, meta)
        self.n_seen += other.n_seen
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain dict (torch tensors and ints) for ``torch.save``; entries sorted by key."""
        order = torch.from_numpy(self._sort_order())
        vectors = self._vec[:, : self._m].index_select(1, order)
        for l, d in enumerate(self.dims):
            vectors[l, :, d:] = 0.0  # a narrower layer's unused columns were never written
        return {
            "kind": "PositionSample",
            "version": _STATE_VERSION,
            "size": self.size,
            "n_layers": self.n_layers,
            "dim": self.dim,
            "seed": self.seed,
            "order": self.order,
            "n_seen": self.n_seen,
            "keys": torch.from_numpy(self.keys.copy()),
            "vectors": vectors,
            "metadata": {nm: torch.from_numpy(self.metadata(nm).copy()) for nm in self.metadata_names},
            "metadata_names": list(self._meta_names) if self._meta_names is not None else None,
        }

    @classmethod
    def from_state_dict(cls, sd: dict, device=None) -> "PositionSample":
        """Rebuild a sample from :meth:`state_dict` (priorities are recomputed from the
        keys and the seed); a state no sample could have written is refused
        (EmbgeomError). `device` is checked only: the sample lives in host memory."""
        k_ = "PositionSample"
        _state.check_kind(sd, k_, versions=(_STATE_VERSION,))
        if device is not None:
            torch.device(device)
        try:
            dim = [int(d) for d in sd["dim"]] if isinstance(sd["dim"], (list, tuple)) else int(sd["dim"])
            s = cls(int(sd["size"]), int(sd["n_layers"]), dim, int(sd["seed"]), str(sd.get("order", "random")))
            keys = _as_keys(_state.tensor(sd["keys"], k_, "keys", (None,), floating=False))
            vec = _state.tensor(sd["vectors"], k_, "vectors", (s.n_layers, keys.shape[0], max(s.dims))).to(torch.float32)
            meta = {str(nm): _as_keys(_state.tensor(v, k_, f"metadata[{nm!r}]", (keys.shape[0],), floating=False))
                    for nm, v in dict(sd.get("metadata", {})).items()}
            names = sd.get("metadata_names", list(meta))
            n_seen = _state.count(sd["n_seen"], k_, "n_seen", low=keys.shape[0])
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbgeomError(f"not a PositionSample state dict: {exc}") from exc
        m = keys.shape[0]
        if m > s.size or tuple(vec.shape) != (s.n_layers, m, max(s.dims)) or any(v.shape[0] != m for v in meta.values()):
            raise EmbgeomError("PositionSample state dict has inconsistent shapes")
        if names is not None:
            s._fix_meta(tuple(names), "from_state_dict")
            if set(meta) != set(s.metadata_names):
                raise EmbgeomError("PositionSample state dict: metadata fields do not match metadata_names")
        if m:
            s._insert(keys, s._priorities(keys),
                      lambda l, sel: vec[l, :, : s.dims[l]].index_select(0, torch.from_numpy(sel.astype(np.int64))), meta)
        s.n_seen = n_seen
        return s

    def to(self, device) -> "PositionSample":
        """The accumulators' common protocol; the sample stays in host memory whatever
        the device (the exact kNN reads it there), so `device` is only checked."""
        torch.device(device)
        return self

"""All accumulators of one model run: per stack, per layer, split into inliers and
outliers by norm, so both views come from one pass.

The `inliers` view keeps tokens whose norm at a layer is at most `outlier_factor`
times that layer's median norm, the median calibrated on the batches given before
`calibrate()` is called (the pipeline gives the first windows of the stream). Inliers and outliers are
accumulated apart and the `all` view is their exact merge: no statistic is ever
computed twice, and outliers (rare) cost almost nothing. A view is therefore a
filter in front of the same accumulators, for every metric.
"""
from __future__ import annotations

import math

import torch

from .cross_moments import centred
from .moments import Moments, NonFiniteInput
from .position_sample import PositionSample
from .token_moments import TokenMoments
from ._layer_id import IntrinsicDimension
from ._layer_pairs import CrossLayerSums
from ._layer_parts import VIEWS, WINDOW_SUMS, LayerAccumulators, NonFiniteHidden, PairAccumulators, _Pending
from ._layer_state import LayerState
from ..errors import EmbgeomError

__all__ = ["LayerStatistics", "LayerAccumulators", "PairAccumulators", "NonFiniteHidden", "VIEWS", "WINDOW_SUMS"]


class LayerStatistics(CrossLayerSums, IntrinsicDimension, LayerState):
    """Streaming statistics of every layer of every stack, in two views.

    Parameters
    ----------
    n_layers : {stack: number of blocks}; hidden states are n_layers + 1 per stack.
    width : vector width d, or {stack: one width per hidden state} for a model whose
        hidden states differ in width (OPT-350m projects its last one).
    outlier_factor : inliers have ‖x‖ ≤ outlier_factor × median ‖x‖ of their layer.
        Batches are held back until `calibrate()` (or `finish()`) fixes the medians
        from them, then go into the accumulators like every later batch.
    with_types : keep per-token-type moments (paper B) too.
    type_layers : {stack: layer indices (0 to n_layers)} keeping per-type moments;
        a stack not named, or None, keeps them at every layer. Per-type tables hold
        d float64 per type and layer, the bulk of a long run's memory, so a big
        model may keep them at a few layers only.
    type_capacity : expected number of token types (rows allocated once).
    id_sample : positions kept (uniformly, by seeded hash of their keys) with their
        vectors in every layer, for intrinsic dimension; 0 keeps none.
    seed : the sample's seed.
    id_order : "random" (a uniform sample of positions) or "first" (the first
        `id_sample` counted positions of the stream: paper A's protocol).
    precision : "auto" (float32 products for batches in model precision, float64
        accumulation) or "float64" (every product in float64); see `Moments`.
    cross_layer : keep the float64 cross-moments of every pair of consecutive layers
        (d_l × d_{l+1} each), for linear CKA and linearity. Their inliers view is the
        tokens that are inliers at both layers of the pair.

    window_measures : add each window's curvature and prompt entropy over its
        counted tokens (the inliers view: its counted tokens that are inliers at
        that layer) to per-layer sums, for their means over windows.

    The cross-layer pairs and window sums, the intrinsic dimension and the state
    dict are written in `_layer_pairs`, `_layer_id` and `_layer_state` (mixins).
    """

    def __init__(self, n_layers: dict, width: int | dict, device=None, outlier_factor: float = 10.0,
                 with_types: bool = True, type_capacity: int = 0, id_sample: int = 0, seed: int = 0,
                 type_layers: dict | None = None, id_order: str = "random", precision: str = "auto",
                 cross_layer: bool = True, window_measures: bool = True):
        self.n_layers = dict(n_layers)
        self.precision = precision
        self.cross_layer = bool(cross_layer)
        self.window_measures = bool(window_measures)
        self.width = width
        self.widths = self.layer_widths(self.n_layers, width)
        self.device = torch.device(device) if device is not None else None
        self.id_sample = int(id_sample)
        self.seed = int(seed)
        self.id_order = id_order
        self.outlier_factor = float(outlier_factor)
        self.with_types = with_types
        self.type_layers = self.typed_layers(self.n_layers, with_types, type_layers)

        def part(capacity):
            return {s: [LayerAccumulators.new(self.widths[s][layer], device, layer in self.type_layers[s], capacity,
                                              precision)
                        for layer in range(n + 1)] for s, n in self.n_layers.items()}

        self.inliers = part(type_capacity)
        self.outliers = part(0)
        self.pairs = {s: [PairAccumulators.new(self.widths[s][layer], self.widths[s][layer + 1], device, precision)
                          for layer in range(n)] for s, n in self.n_layers.items()} if self.cross_layer else {}
        self.window_sums = {s: torch.zeros(n + 1, len(VIEWS), WINDOW_SUMS, dtype=torch.float64, device=device)
                            for s, n in self.n_layers.items()}
        self.median_norm: dict = {s: None for s in self.n_layers}  # stack -> list per layer
        self.calibrated_on: dict = {s: 0 for s in self.n_layers}
        self._pending = {s: _Pending() for s in self.n_layers}
        self._outlier_rows: list = []
        self._id_cache: dict = {}
        self.knn_runs: list = []  # the diagnostics of each k-NN search (knn_summary)
        self._consumed: set = set()  # (stack, layer) whose outliers were merged into the inliers
        self.samples = {s: PositionSample(id_sample, n + 1, self._sample_dim(s), seed=seed, order=id_order)
                        for s, n in self.n_layers.items()} \
            if id_sample > 0 else {}

    @staticmethod
    def layer_widths(n_layers: dict, width) -> dict:
        """{stack: [width of each hidden state]} from one width or per-stack lists."""
        if not isinstance(width, dict):
            return {s: [int(width)] * (n + 1) for s, n in n_layers.items()}
        out = {}
        for s, n in n_layers.items():
            w = width.get(s)
            if not isinstance(w, (list, tuple)) or len(w) != n + 1:
                raise EmbgeomError(f"width[{s!r}] must list {n + 1} widths (one per hidden state), got {w!r}")
            out[s] = [int(v) for v in w]
        return out

    def _sample_dim(self, stack: str):
        w = self.widths[stack]
        return w[0] if len(set(w)) == 1 else list(w)

    @staticmethod
    def typed_layers(n_layers: dict, with_types: bool, type_layers: dict | None) -> dict:
        """{stack: sorted tuple of the layers keeping per-type moments}, validated."""
        typed = {}
        for s, n in n_layers.items():
            chosen = None if type_layers is None else type_layers.get(s)
            if not with_types:
                typed[s] = ()
            elif chosen is None:
                typed[s] = tuple(range(n + 1))
            else:
                bad = [c for c in chosen if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= n]
                if bad:
                    raise EmbgeomError(f"type_layers[{s!r}] holds {bad[0]!r}, not a layer of this {s} (0 to {n})")
                typed[s] = tuple(sorted(set(chosen)))
        return typed

    # ----------------------------------------------------------------- updates
    def update(self, stack: str, hidden, counted: torch.Tensor, token_types: torch.Tensor,
               meta: dict | None = None, keys: torch.Tensor | None = None,
               calibration: torch.Tensor | None = None) -> None:
        """Add one batch of one stack.

        hidden : sequence over layers of (B, T, d) tensors.
        counted : (B, T) bool, the tokens to count.
        token_types : (B, T) int64 type of each position.
        meta : optional {name: (B, T) int64} carried into the outlier list
            (e.g. token id, window, position).
        keys : (B, T) int64 stream-unique key of every position (needed when
            id_sample > 0): the sample keeps the positions with the smallest seeded
            hash of their key, so it does not depend on batching or sharding.
        calibration : optional (B, T) bool, for a batch given before calibration:
            the counted positions whose norms the median is taken over (default:
            all), so a batch may hold windows beyond the calibration ones.
        """
        self._id_cache.clear()  # estimates of earlier data no longer hold
        flat = counted.reshape(-1)
        # Order does not matter to any accumulator (per-type sums follow the groups'
        # permutation), so a batch whose every position counts (no padding, no
        # exclusion: the common case) is read in place, with no gather at all; any
        # other keeps its counted rows in stream order.
        idx = None if bool(flat.all()) else flat.nonzero().squeeze(1)

        def rows(t):
            t = t.reshape(-1, *t.shape[2:])
            return t if idx is None else t.index_select(0, idx.to(t.device))

        types = rows(token_types)
        lengths = counted.sum(1)
        metas = {k: rows(v) for k, v in (meta or {}).items()}
        xs = []
        for layer, h in enumerate(hidden):
            x = rows(h)
            # With --device-map the layers may live on several devices; the
            # accumulators live on one.
            xs.append(x if self.device is None or x.device == self.device else x.to(self.device))
        if self.samples:
            if keys is None:
                raise EmbgeomError("LayerStatistics.update needs keys when id_sample > 0")
            k = rows(keys)
            self.samples[stack].update(k, xs, {n: v for n, v in metas.items() if n in ("token_id", "position")})
        if self.median_norm[stack] is None:
            p = self._pending[stack]
            p.xs.append(xs)
            p.types.append(types)
            p.meta.append(metas)
            p.calib.append(None if calibration is None else rows(calibration))
            p.lengths.append(lengths)
            p.n += int(types.numel())
            return
        self._accumulate(stack, xs, types, metas, lengths)

    def _calibrate(self, stack: str, gather=None) -> None:
        p = self._pending[stack]
        L = self.n_layers[stack] + 1
        if p.xs:
            def calibration_norms(b, keep, layer):
                x = b[layer] if keep is None else b[layer][keep.to(b[layer].device)]
                return torch.linalg.vector_norm(x.double(), dim=1).cpu()

            norms = torch.stack([torch.cat([calibration_norms(b, keep, layer) for b, keep in zip(p.xs, p.calib)])
                                 for layer in range(L)])
        else:
            norms = torch.zeros(L, 0, dtype=torch.float64)
        if gather is not None:
            # Every rank holds part of the calibration windows: the median is taken
            # over all of them, so every rank uses the same threshold.
            norms = torch.cat(list(gather(norms)), dim=1)
        medians = [float(norms[layer].median()) if norms.shape[1] else math.nan for layer in range(L)]
        self.median_norm[stack] = medians
        self.calibrated_on[stack] = int(norms.shape[1])
        self._pending[stack] = _Pending()
        for xs, types, metas, lengths in zip(p.xs, p.types, p.meta, p.lengths):
            self._accumulate(stack, xs, types, metas, lengths)

    @property
    def calibrated(self) -> bool:
        return all(m is not None for m in self.median_norm.values())

    def calibrate(self, gather=None) -> None:
        """Fix each layer's median norm from the batches held back so far, then
        accumulate them. Later calls do nothing.

        gather : optional function taking this process's (layers, n) float64 tensor
            of calibration norms and returning the list of every process's tensor
            (an all-gather), so that sharded runs share one threshold. It is called
            once per stack, on every process alike.
        """
        for stack in self.n_layers:
            if self.median_norm[stack] is None:
                self._calibrate(stack, gather)

    def finish(self, gather=None) -> None:
        """End of stream: calibrate if that has not happened yet."""
        self.calibrate(gather)

    def _accumulate(self, stack, xs, types, metas, lengths) -> None:
        groups = TokenMoments.group(types) if self.with_types else None
        outs = []
        for layer, x in enumerate(xs):
            try:
                outs.append(self._accumulate_layer(stack, layer, x, types, groups, metas))
            except NonFiniteInput:
                raise NonFiniteHidden(stack, layer) from None
            if self.window_measures:
                self._accumulate_windows(stack, layer, x, outs[-1], lengths)
        cache = {}  # layer -> its `centred` form: a layer shared by two pairs is prepared once

        def whole(layer):
            if layer not in cache:
                cache[layer] = centred(xs[layer], self.device, self.precision)
            return cache[layer]

        for layer, pair in enumerate(self.pairs.get(stack, ())):
            if outs[layer] is None and outs[layer + 1] is None:
                pair.both.update_centred(whole(layer), whole(layer + 1))
            else:
                self._accumulate_pair(pair, xs[layer], xs[layer + 1], outs[layer], outs[layer + 1])
            cache.pop(layer, None)

    def _accumulate_layer(self, stack, layer, x, types, groups, metas):
        """Accumulate one layer's rows; returns their outlier mask (None: none)."""
        limit = self.outlier_factor * self.median_norm[stack][layer]
        norms = torch.linalg.vector_norm(x, dim=1)
        out = norms > limit
        if not bool(out.any()):
            self.inliers[stack][layer].update(x, groups)
            return None
        keep = ~out
        typed = self.inliers[stack][layer].types is not None
        g_in = TokenMoments.group(types[keep]) if typed else None
        g_out = TokenMoments.group(types[out]) if typed else None
        self.inliers[stack][layer].update(x[keep], g_in)
        self.outliers[stack][layer].update(x[out], g_out)
        row = {k: v[out].cpu() for k, v in metas.items()}
        row.update(stack=stack, layer=layer, norm=norms[out].double().cpu(),
                   median=self.median_norm[stack][layer])
        self._outlier_rows.append(row)
        return out

    # ----------------------------------------------------------------- results
    def view(self, name: str, stack: str, layer: int, in_place: bool = False) -> LayerAccumulators:
        """The accumulators of one view ('all' merges inliers and outliers exactly).

        in_place : build 'all' by merging the outliers into the inliers' own
            accumulators instead of a copy (no second per-type table in memory);
            afterwards that layer's 'inliers' view is gone, so read it first.
        """
        key = (stack, layer)
        if name == "inliers":
            if key in self._consumed:
                raise EmbgeomError(f"the inliers view of {stack} layer {layer} was merged into 'all' in place")
            return self.inliers[stack][layer]
        if name == "all":
            inl, out = self.inliers[stack][layer], self.outliers[stack][layer]
            if out.moments.n == 0 or key in self._consumed:
                return inl
            if not in_place:
                return inl.merged_with(out)
            inl.moments.merge(out.moments)
            if inl.types is not None:
                inl.types.merge(out.types)
            self._consumed.add(key)
            return inl
        raise EmbgeomError(f"unknown view {name!r}; use one of {VIEWS}")

    def to(self, device) -> "LayerStatistics":
        """Move every accumulator to `device` in place (the ID sample stays in host
        memory); returns self."""
        self.device = torch.device(device)
        for part in (self.inliers, self.outliers):
            for accs in part.values():
                for a in accs:
                    a.moments.to(self.device)
                    if a.types is not None:
                        a.types.to(self.device)
        return self

    def merge(self, other: "LayerStatistics") -> "LayerStatistics":
        """Merge another process's statistics into these, exactly; both must be
        calibrated with the same thresholds. Returns self."""
        if not isinstance(other, LayerStatistics):
            raise EmbgeomError(f"can only merge LayerStatistics, got {type(other).__name__}")
        for name in ("n_layers", "widths", "outlier_factor", "with_types", "type_layers", "id_sample", "seed",
                     "id_order", "cross_layer", "window_measures"):
            if getattr(self, name) != getattr(other, name):
                raise EmbgeomError(f"cannot merge LayerStatistics with different {name}: "
                                   f"{getattr(self, name)!r} vs {getattr(other, name)!r}")
        def same(a, b):
            return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))

        if not (self.calibrated and other.calibrated) or not all(
                same(self.median_norm[s], other.median_norm[s]) for s in self.n_layers):
            raise EmbgeomError("cannot merge LayerStatistics calibrated on different outlier thresholds")
        for mine, theirs in ((self.inliers, other.inliers), (self.outliers, other.outliers)):
            for s in self.n_layers:
                for a, b in zip(mine[s], theirs[s]):
                    a.moments.merge(b.moments)
                    if a.types is not None:
                        a.types.merge(b.types)
        for s, ps in self.pairs.items():
            for a, b in zip(ps, other.pairs[s]):
                a.merge(b)
        for s, t in self.window_sums.items():
            t += other.window_sums[s].to(t.device)
        for s, smp in self.samples.items():
            smp.merge(other.samples[s])
        self._outlier_rows.extend(other._outlier_rows)
        self._id_cache = {}
        return self

    @property
    def products(self) -> list[str]:
        """The dtypes the covariance products were formed in, over every layer (for
        the run record): ['float32'], ['float64'] or both."""
        return sorted(set().union(*(a.moments.products for part in (self.inliers, self.outliers)
                                    for accs in part.values() for a in accs)))

    def outlier_records(self) -> list[dict]:
        return self._outlier_rows

    @property
    def nbytes(self) -> int:
        acc = sum(a.nbytes for part in (self.inliers, self.outliers) for accs in part.values() for a in accs)
        acc += sum(p.nbytes for ps in self.pairs.values() for p in ps)
        return acc + sum(s.nbytes for s in self.samples.values())

    @staticmethod
    def planned_parts(n_layers: dict, width: int | dict, n_types: int | None = None, id_sample: int = 0,
                      type_layers: dict | None = None, cross_layer: bool = True) -> dict:
        """``nbytes`` at the end of a run, in parts {'covariances', 'per-type means',
        'cross-layer moments', 'ID sample'}, for a run whose every typed layer
        (`type_layers`, as in the constructor) meets `n_types` token types (None: no
        per-type statistics) among its inliers, sized as the pipeline sizes them (n_types + 1 rows), before any
        outlier's per-type rows (outliers are few: their tables grow from nothing).
        The outliers' covariances (and the cross-moments' parts that only meet
        outliers) are counted, though a layer that meets no outlier
        never allocates them: the plan is an upper bound, reached when every layer
        has outliers. Known before the stream starts, so a run that cannot fit is
        refused then."""
        widths = LayerStatistics.layer_widths(n_layers, width)
        parts = {"covariances": sum(2 * Moments.nbytes_for(w) for ws in widths.values() for w in ws)}  # in- and outliers
        if n_types is not None:
            typed = LayerStatistics.typed_layers(n_layers, True, type_layers)
            parts["per-type means"] = sum(TokenMoments.nbytes_for(widths[s][layer], n_types + 1, n_types)
                                          for s, layers in typed.items() for layer in layers)
        if cross_layer:  # upper bound, like the outliers' covariances
            parts["cross-layer moments"] = sum(PairAccumulators.nbytes_for(ws[i], ws[i + 1])
                                               for ws in widths.values() for i in range(len(ws) - 1))
        if id_sample > 0:
            parts["ID sample"] = sum(PositionSample.nbytes_for(id_sample, len(ws), ws) for ws in widths.values())
        return parts

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
from dataclasses import dataclass, field

import torch

from .cross_moments import CrossMoments, centred, scatter_without
from .moments import Moments, NonFiniteInput
from .position_sample import PositionSample
from .token_moments import TokenMoments
from . import _state
from ..errors import EmbgeomError
from ..metrics.trajectory import padded_windows, window_curvatures, window_entropies

VIEWS = ("all", "inliers")
# Per (layer, view) sums over windows: curvature sum and count, prompt entropy sum and count.
WINDOW_SUMS = 4


@dataclass
class PairAccumulators:
    """Cross-moments of one pair of consecutive layers (l, l + 1) of a stack.

    both : the tokens that are inliers at both layers (the pair's inliers view).
    rest : every other token (outlier at one layer or both); all = both ⊕ rest.
    drop_x : layer l's vectors of the tokens inlier at l but outlier at l + 1, and
    drop_y : layer l + 1's of those inlier at l + 1 but outlier at l: taken out of
        each layer's inlier moments, they leave the moments of `both`'s tokens.
    """

    both: CrossMoments
    rest: CrossMoments
    drop_x: Moments
    drop_y: Moments

    @classmethod
    def new(cls, dx, dy, device):
        return cls(CrossMoments(dx, dy, device), CrossMoments(dx, dy, device), Moments(dx, device=device),
                   Moments(dy, device=device))

    def parts(self):
        return (self.both, self.rest, self.drop_x, self.drop_y)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).state_dict() for k in ("both", "rest", "drop_x", "drop_y")}

    @classmethod
    def from_state_dict(cls, sd: dict, device=None):
        return cls(CrossMoments.from_state_dict(sd["both"], device), CrossMoments.from_state_dict(sd["rest"], device),
                   Moments.from_state_dict(sd["drop_x"], device), Moments.from_state_dict(sd["drop_y"], device))

    def merge(self, other: "PairAccumulators") -> None:
        for a, b in zip(self.parts(), other.parts()):
            a.merge(b)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts())

    @staticmethod
    def nbytes_for(dx: int, dy: int) -> int:
        """Upper bound: every part allocated (the last three only meet outliers)."""
        return 2 * CrossMoments.nbytes_for(dx, dy) + Moments.nbytes_for(dx) + Moments.nbytes_for(dy)


@dataclass
class LayerAccumulators:
    """Accumulators of one (stack, layer) for one part (inliers or outliers)."""

    moments: Moments
    types: TokenMoments | None

    @classmethod
    def new(cls, width, device, with_types, capacity=0, precision="auto"):
        return cls(Moments(width, device=device, precision=precision), TokenMoments(width, device=device, capacity=capacity) if with_types else None)

    def update(self, x: torch.Tensor, groups) -> None:
        self.moments.update(x)
        if self.types is not None:
            self.types.update(x, groups)

    def merged_with(self, other: "LayerAccumulators") -> "LayerAccumulators":
        m = Moments.from_state_dict(self.moments.state_dict()).merge(other.moments)
        t = None
        if self.types is not None:
            t = TokenMoments.from_state_dict(self.types.state_dict()).merge(other.types)
        return LayerAccumulators(m, t)

    @property
    def nbytes(self) -> int:
        return self.moments.nbytes + (self.types.nbytes if self.types is not None else 0)


@dataclass
class _Pending:
    """Counted vectors held back until the outlier threshold is calibrated."""

    xs: list = field(default_factory=list)  # per batch: list over layers of (n, d)
    types: list = field(default_factory=list)
    meta: list = field(default_factory=list)
    calib: list = field(default_factory=list)  # per batch: (n,) bool rows the median is taken over, or None (all)
    lengths: list = field(default_factory=list)  # per batch: (B,) counted rows of each window
    n: int = 0


class NonFiniteHidden(EmbgeomError):
    """Hidden states with NaN or inf (the caller, who knows the dtype, adds the fix)."""

    def __init__(self, stack: str, layer: int):
        super().__init__(f"hidden states of {stack} layer {layer} are not finite (NaN or inf)")
        self.stack, self.layer = stack, layer


class LayerStatistics:
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

    Every batch also adds each window's curvature and prompt entropy over its
    counted tokens (the inliers view: its counted tokens that are inliers at that
    layer) to per-layer sums, for their means over windows.
    """

    def __init__(self, n_layers: dict, width: int | dict, device=None, outlier_factor: float = 10.0,
                 with_types: bool = True, type_capacity: int = 0, id_sample: int = 0, seed: int = 0,
                 type_layers: dict | None = None, id_order: str = "random", precision: str = "auto",
                 cross_layer: bool = True):
        self.n_layers = dict(n_layers)
        self.precision = precision
        self.cross_layer = bool(cross_layer)
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
        self.pairs = {s: [PairAccumulators.new(self.widths[s][layer], self.widths[s][layer + 1], device)
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
            self._accumulate_windows(stack, layer, x, outs[-1], lengths)
        cache = {}  # layer -> (mean, centred float64 rows): a layer shared by two pairs is converted once

        def whole(layer):
            if layer not in cache:
                cache[layer] = centred(xs[layer], self.device)
            return cache[layer]

        for layer, pair in enumerate(self.pairs.get(stack, ())):
            if outs[layer] is None and outs[layer + 1] is None:
                pair.both.update_centred(*whole(layer), *whole(layer + 1))
            else:
                self._accumulate_pair(pair, xs[layer], xs[layer + 1], outs[layer], outs[layer + 1])
            cache.pop(layer, None)

    def _accumulate_windows(self, stack, layer, x, out, lengths) -> None:
        """Add each window's curvature and prompt entropy (both views) to the sums.
        A window without an outlier has the same values in both views: only the
        windows holding one are measured again, on their inliers."""
        sums = self.window_sums[stack][layer]
        lengths = lengths.to(x.device)

        def measure(rows, lens):
            P = padded_windows(rows, lens)
            return torch.stack([window_curvatures(P, lens), window_entropies(P)])  # (2, windows)

        def add(v, values):
            ok = torch.isfinite(values)
            sums[v] += torch.stack([torch.where(ok, values, 0.0).sum(1), ok.sum(1).double()], 1).reshape(-1).to(sums.device)

        values = measure(x, lengths)
        add(0, values)
        if out is not None:
            B = lengths.numel()
            win = torch.repeat_interleave(torch.arange(B, device=x.device), lengths)
            hit = torch.zeros(B, dtype=torch.bool, device=x.device)
            hit[win[out]] = True
            rows = ~out & hit[win]
            values = values.clone()
            values[:, hit] = measure(x[rows], torch.bincount(win[rows], minlength=B)[hit])
        add(1, values)

    @staticmethod
    def _accumulate_pair(pair: PairAccumulators, x, y, out_x, out_y) -> None:
        if out_x is None and out_y is None:
            pair.both.update(x, y)
            return
        ox = out_x if out_x is not None else torch.zeros_like(out_y)
        oy = out_y if out_y is not None else torch.zeros_like(out_x)
        either = ox | oy
        pair.both.update(x[~either], y[~either])
        pair.rest.update(x[either], y[either])
        pair.drop_x.update(x[~ox & oy])
        pair.drop_y.update(y[ox & ~oy])

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

    def intrinsic_dimension(self, stack: str, layer: int, view: str, k: int = 20,
                            discard_fraction: float = 0.1, duplicates: str = "drop") -> dict:
        """The id_* columns of one layer and view, from the distinct vectors of the
        position sample (a repeated vector, e.g. one token's embedding, counts once;
        the inliers view drops those above the layer's outlier limit). With
        duplicates="keep-rank" the repeated vectors stay, as paper A keeps them.

        discard_fraction : TwoNN's share of the largest ratios left out.
        duplicates : "drop" (points whose nearest neighbour is at distance 0 are
            dropped before ranking) or "keep-rank" (paper A: points with
            μ ≤ 1 + 1e-8 are left out of the fit but keep their ranks; see
            `embgeom.metrics.intrinsic_dim.twonn_ranked_from_distances`); only
            id_twonn depends on it.

        One k-NN search serves both views: the inliers are searched, and when the
        sample holds a few outliers, the all view's k-NN extends the inliers' by
        comparing those few with every point (exact, as a second search would be)."""
        from ..metrics.intrinsic_dim import distinct_points, intrinsic_dimensions, twonn_ranked_from_distances
        from ..metrics.neighbors import extend_knn_distances, knn_distances

        nan = float("nan")
        empty = dict(id_twonn=nan, id_twonn_ml=nan, id_twonn_ml_low=nan, id_twonn_ml_high=nan, id_mle=nan, id_n=0)
        sample = self.samples.get(stack)
        if sample is None or len(sample) < 3:
            return empty
        X = torch.from_numpy(sample.layer(layer))
        if duplicates == "drop":
            X = distinct_points(X)
        limit = self.outlier_factor * self.median_norm[stack][layer]
        keep = torch.linalg.vector_norm(X, dim=1) <= limit
        n, m = X.shape[0], int(keep.sum())
        # The inliers are a subset of all points: the same count means the same
        # points, whichever view came first.
        cache = self._id_cache.setdefault((stack, layer), {})
        if cache.setdefault("options", (discard_fraction, duplicates)) != (discard_fraction, duplicates):
            cache.clear()  # estimates made with other options do not hold
            cache["options"] = (discard_fraction, duplicates)
        want = m if view == "inliers" else n
        if want in cache:
            return cache[want]
        if want < 3:
            return empty

        def estimate(dist, points):
            out = intrinsic_dimensions(distances=dist, k=k, discard_fraction=discard_fraction)
            if duplicates == "keep-rank":
                scale = float(torch.linalg.vector_norm(points.double() - points.double().mean(0), dim=1).mean())
                try:
                    out["id_twonn"] = twonn_ranked_from_distances(dist, discard_fraction, scale=scale)
                except EmbgeomError:
                    out["id_twonn"] = nan
            return out

        inliers_dist = cache.get("inliers_dist")
        if inliers_dist is None and m >= 3 and (view == "inliers" or n - m <= max(64, n // 8)):
            X_in = X if m == n else X[keep]
            inliers_dist, info = knn_distances(X_in, min(k, m - 1), return_info=True)
            cache["inliers_dist"] = inliers_dist
            self.knn_runs.append(info)
            cache[m] = estimate(inliers_dist, X_in)
        if m == n:  # one set of points: both views are done
            cache.pop("inliers_dist", None)
        if view == "inliers" or m == n:
            return cache[want]
        if inliers_dist is not None:  # a few outliers: extend the inliers' search
            dist = extend_knn_distances(X, keep, inliers_dist, min(k, n - 1))
        else:  # many: search them all
            dist, info = knn_distances(X, min(k, n - 1), return_info=True)
            self.knn_runs.append(info)
        cache[n] = estimate(dist, X)
        cache.pop("inliers_dist", None)  # both views done
        return cache[n]

    def window_means(self, stack: str, layer: int, view: str) -> dict:
        """{'curvature', 'prompt_entropy'}: the mean over windows (each weighted
        equally) of each window's value over its counted tokens of the view; windows
        of fewer than 3 such tokens have no curvature. NaN when no window has one."""
        c_sum, c_n, e_sum, e_n = self.window_sums[stack][layer, VIEWS.index(view)].tolist()
        return dict(curvature=c_sum / c_n if c_n else math.nan, prompt_entropy=e_sum / e_n if e_n else math.nan)

    def _pair_moments(self, stack: str, layer: int, view: str):
        """(n, mean, scatter) of one layer's vectors over the tokens of a pair's view
        (`layer` is either layer of the pair ending at `pair_end`)."""
        inl, out = self.inliers[stack][layer].moments, self.outliers[stack][layer].moments
        m = inl
        if view == "all" and out.n:
            m = Moments.from_state_dict(inl.state_dict()).merge(out)
        return m.n, (m.mean if m.n else None), (m.covariance * m.n if m.n else None)

    def cross_layer_metrics(self, stack: str) -> dict:
        """{layer: {view: {'linear_cka', 'linearity'}}} between each layer ≥ 1 and the
        one before it, from the cross-moments (empty without cross_layer). Read
        before `view(..., in_place=True)` consumes a layer's inliers view."""
        from ..metrics.cross_layer import cka_from_covariances, linearity_from_covariances

        nan = dict(linear_cka=math.nan, linearity=math.nan)
        out = {}
        for layer, pair in enumerate(self.pairs.get(stack, ()), start=1):
            if (stack, layer - 1) in self._consumed or (stack, layer) in self._consumed:
                raise EmbgeomError("cross_layer_metrics must be read before the views are merged in place")
            out[layer] = {}
            for view in VIEWS:
                cross = pair.both if view == "inliers" else pair.both.copy().merge(pair.rest)
                if cross.n < 2:
                    out[layer][view] = dict(nan)
                    continue
                nx, mx, sx = self._pair_moments(stack, layer - 1, view)
                ny, my, sy = self._pair_moments(stack, layer, view)
                if view == "inliers":
                    dx, dy = pair.drop_x, pair.drop_y
                    if dx.n:
                        sx = scatter_without(nx, mx, sx, dx.n, dx.mean, dx.covariance * dx.n)
                    if dy.n:
                        sy = scatter_without(ny, my, sy, dy.n, dy.mean, dy.covariance * dy.n)
                sxy = cross.cross_scatter
                out[layer][view] = dict(linear_cka=cka_from_covariances(sx, sy, sxy),
                                        linearity=linearity_from_covariances(sx, sy, sxy))
        return out

    def id_scales(self, stack: str, layer: int, view: str, max_rank: int = 64):
        """GRIDE at every scale (DataFrame n1, n2, scale, id, id_err) on the position
        sample's distinct points of the view (the inliers view drops sampled positions
        above the layer's outlier limit); None without a sample of 3 points."""
        from ..metrics.gride import gride

        sample = self.samples.get(stack)
        if sample is None or len(sample) < 3:
            return None
        X = torch.from_numpy(sample.layer(layer))
        if view == "inliers":
            limit = self.outlier_factor * self.median_norm[stack][layer]
            X = X[torch.linalg.vector_norm(X, dim=1) <= limit]
        # The inliers are a subset of all points: the same count means the same points.
        cache = self._id_cache.setdefault(("gride", stack, layer, max_rank), {})
        if X.shape[0] not in cache:
            try:
                cache[X.shape[0]] = gride(X, max_rank)
            except EmbgeomError:  # fewer than 3 distinct points: no scale to read
                cache[X.shape[0]] = None
        table = cache[X.shape[0]]
        return None if table is None else table.copy()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to rebuild these statistics exactly (plain CPU tensors,
        lists and numbers; torch.save-able). Only after calibration: the batches held
        back for it are not part of the state."""
        if not self.calibrated:
            raise EmbgeomError("LayerStatistics.state_dict() before calibrate(): the held-back batches have no state")

        def part(p):
            return {s: [{"moments": a.moments.state_dict(),
                         "types": a.types.state_dict() if a.types is not None else None} for a in accs]
                    for s, accs in p.items()}

        return {
            "kind": "LayerStatistics", "version": 2, "cross_layer": self.cross_layer,
            "pairs": {s: [p.state_dict() for p in ps] for s, ps in self.pairs.items()},
            "window_sums": {s: t.cpu().clone() for s, t in self.window_sums.items()},
            "n_layers": dict(self.n_layers), "width": self.width, "outlier_factor": self.outlier_factor,
            "with_types": self.with_types, "id_sample": self.id_sample, "seed": self.seed,
            "id_order": self.id_order,
            "precision": self.precision,
            "type_layers": {st: list(v) for st, v in self.type_layers.items()},
            "median_norm": {s: list(m) for s, m in self.median_norm.items()},
            "calibrated_on": dict(self.calibrated_on),
            "inliers": part(self.inliers), "outliers": part(self.outliers),
            "samples": {s: smp.state_dict() for s, smp in self.samples.items()},
            "outlier_rows": list(self._outlier_rows),
        }

    @classmethod
    def from_state_dict(cls, sd: dict, device=None, *, type_capacity: int = 0) -> "LayerStatistics":
        """Rebuild statistics from ``state_dict()`` exactly, on `device`; a state that
        does not fit together (shapes, layer counts, thresholds) is refused."""
        k = "LayerStatistics"
        _state.check_kind(sd, k, versions=(2,))
        try:
            stats = cls(sd["n_layers"], sd["width"], device, outlier_factor=sd["outlier_factor"],
                        with_types=sd["with_types"], id_sample=0, seed=sd["seed"], type_layers=sd.get("type_layers"),
                        id_order=sd.get("id_order", "random"), precision=sd.get("precision", "auto"),
                        cross_layer=False)
            stats.id_sample = _state.count(sd["id_sample"], k, "id_sample")
            stats.median_norm = {s: _state.finite_or_nan(sd["median_norm"][s], k, f"median_norm[{s!r}]", n + 1)
                                 for s, n in stats.n_layers.items()}
            stats.calibrated_on = {s: _state.count(sd["calibrated_on"][s], k, "calibrated_on") for s in stats.n_layers}
            stats.inliers = stats._parts_from(sd["inliers"], device, type_capacity)
            stats.outliers = stats._parts_from(sd["outliers"], device, 0)
            stats._cross_layer_from(sd, device)
            stats.samples = {s: PositionSample.from_state_dict(sd["samples"][s]) for s in stats.n_layers} \
                if stats.id_sample > 0 else {}
            rows = sd["outlier_rows"]
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise TypeError("outlier_rows must be a list of dicts")
            stats._outlier_rows = list(rows)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EmbgeomError(f"LayerStatistics state_dict is malformed ({type(exc).__name__}: {exc})") from None
        return stats

    def _cross_layer_from(self, sd: dict, device) -> None:
        """The cross-layer pairs and per-window sums of a state dict, checked against
        this object's stacks and layer counts."""
        k = "LayerStatistics"
        if not isinstance(sd["cross_layer"], bool):
            raise TypeError("cross_layer must be True or False")
        self.cross_layer = sd["cross_layer"]
        pairs, sums = sd["pairs"], sd["window_sums"]
        if set(pairs) != set(self.n_layers) or set(sums) != set(self.n_layers):
            raise EmbgeomError(f"{k} state_dict: pairs and window_sums must name the stacks {sorted(self.n_layers)}")
        self.pairs = {s: [PairAccumulators.from_state_dict(p, device) for p in ps] for s, ps in pairs.items()}
        for s, n in self.n_layers.items():
            if self.cross_layer and len(self.pairs[s]) != n:
                raise EmbgeomError(f"{k} state_dict: {s} must hold {n} pairs of consecutive layers")
        self.window_sums = {}
        for s, t in sums.items():
            t = _state.tensor(t, k, f"window_sums[{s!r}]", (self.n_layers[s] + 1,) + tuple(t.shape[1:]))
            self.window_sums[s] = t.to(device if device is not None else "cpu", torch.float64).clone()

    def _parts_from(self, part: dict, device, capacity: int) -> dict:
        """Accumulators of every (stack, layer) from one part of a state dict, checked
        against this object's layers, widths and typed layers."""
        out = {}
        for s, n in self.n_layers.items():
            accs = part[s]
            if not isinstance(accs, list) or len(accs) != n + 1:
                raise EmbgeomError(f"LayerStatistics state_dict: {s} must hold {n + 1} layers' accumulators")
            out[s] = []
            for layer, a in enumerate(accs):
                m = Moments.from_state_dict(a["moments"], device=device)
                typed = layer in self.type_layers[s]
                if m.dim != self.widths[s][layer] or (a["types"] is not None) != typed:
                    raise EmbgeomError(f"LayerStatistics state_dict: {s} layer {layer} does not match the "
                                       "widths or typed layers it names")
                t = TokenMoments.from_state_dict(a["types"], device=device, capacity=capacity) if typed else None
                if t is not None and (t.dim != m.dim or t.n != m.n):
                    raise EmbgeomError(f"LayerStatistics state_dict: {s} layer {layer} counts disagree "
                                       f"(moments {m.n}, per-type {t.n})")
                out[s].append(LayerAccumulators(m, t))
        return out

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
                     "id_order", "cross_layer"):
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

    def knn_summary(self) -> dict:
        """What the k-NN searches did, for run.json: the candidate precision chosen
        per width with the tile timings that chose it, and totals."""
        from .._hardware import bf16_native, cpu_name

        runs = getattr(self, "knn_runs", [])
        return {"cpu": cpu_name(), "bf16_native": bf16_native(), "searches": len(runs),
                "choices": list({(r.get("precision"), str(r.get("tile_seconds"))): {
                    k: r.get(k) for k in ("precision", "chosen_by", "tile_seconds")} for r in runs}.values()),
                "fallback_rows": sum(int(r.get("fallback_rows", 0)) for r in runs),
                "points": sum(int(r.get("n", 0)) for r in runs)}
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

"""LayerStatistics' cross-layer part: the cross-moments of each pair of consecutive
layers (linear CKA and linearity) and the per-window curvature and prompt entropy
sums, both split by view like every other statistic."""
from __future__ import annotations

import math

import torch

from .cross_moments import scatter_without
from .moments import Moments
from ._layer_parts import VIEWS, PairAccumulators
from ..errors import EmbgeomError
from ..metrics.trajectory import padded_windows, window_measures


class CrossLayerSums:
    """Mixin of LayerStatistics: the pairs' and the windows' accumulation and what
    is read off them."""

    def _accumulate_windows(self, stack, layer, x, out, lengths) -> None:
        """Add each window's curvature and prompt entropy (both views) to the sums.
        A window without an outlier has the same values in both views: only the
        windows holding one are measured again, on their inliers."""
        sums = self.window_sums[stack][layer]
        lengths = lengths.to(x.device)

        def measure(rows, lens):
            return window_measures(padded_windows(rows, lens), lens)  # (2, windows)

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

"""LayerStatistics' intrinsic dimension: TwoNN, its ML variant and MLE from one exact
k-NN search of the position sample per layer serving both views, GRIDE across
scales, and the searches' diagnostics."""
from __future__ import annotations

import torch

from ..errors import EmbgeomError


class IntrinsicDimension:
    """Mixin of LayerStatistics: the id_* columns read off the position sample."""

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

"""LayerStatistics' intrinsic dimension: TwoNN, its ML variant and MLE from one exact
k-NN search of the position sample per layer serving both views, GRIDE across
scales, and the searches' diagnostics."""
from __future__ import annotations

import torch

from ..errors import EmbgeomError


# GRIDE's largest rank in the pipeline. With duplicates dropped, one exact search at
# this rank serves TwoNN, its ML variant, MLE (their k ≤ it: the first k columns of
# an exact k-NN are the smaller search's) and GRIDE, in both views.
SHARED_RANK = 64


class IntrinsicDimension:
    """Mixin of LayerStatistics: the id_* columns and ID across scales read off the
    position sample."""

    def _view_distances(self, stack: str, layer: int, view: str, rank: int, distinct: bool):
        """(points, distances) of one view of the position sample: its points (the
        distinct ones when `distinct`; the inliers view drops those above the layer's
        outlier limit) and their exact distances to their min(rank, count − 1)
        nearest others, or None below 3 points.

        One search serves both views, kept for the layer last asked about (the
        distinct points' and, for paper A's protocol, all points'): the
        inliers are searched, and when the sample holds a few outliers, the all
        view's k-NN extends the inliers' by comparing those few with every point
        (exact, as a second search would be)."""
        from ..metrics.intrinsic_dim import distinct_points
        from ..metrics.neighbors import extend_knn_distances, knn_distances

        key = (stack, layer)
        slot = self._id_cache.get(("search", distinct))
        if slot is None or slot["key"] != key:
            X = torch.from_numpy(self.samples[stack].layer(layer))
            if distinct:
                X = distinct_points(X)
            limit = self.outlier_factor * self.median_norm[stack][layer]
            slot = self._id_cache[("search", distinct)] = dict(
                key=key, X=X, keep=torch.linalg.vector_norm(X, dim=1) <= limit, dist={})
        X, keep, found = slot["X"], slot["keep"], slot["dist"]
        n, m = X.shape[0], int(keep.sum())
        points = X if view == "all" or m == n else X[keep]
        count = points.shape[0]  # the inliers are a subset: the same count, the same points
        if count < 3:
            return None
        need = min(rank, count - 1)
        if count in found and found[count].shape[1] >= need:
            return points, found[count][:, :need]

        def search(pts, k):
            dist, info = knn_distances(pts, k, return_info=True)
            self.knn_runs.append(info)
            return dist

        if count == n and m < n and m >= 3 and n - m <= max(64, n // 8):  # a few outliers
            inner = found.get(m)
            if inner is None or inner.shape[1] < min(rank, m - 1):
                inner = found[m] = search(X[keep], min(rank, m - 1))
            found[n] = extend_knn_distances(X, keep, inner, need)
        else:
            found[count] = search(points, need)
        return points, found[count]

    def intrinsic_dimension(self, stack: str, layer: int, view: str, k: int = 20,
                            discard_fraction: float = 0.1, duplicates: str = "drop",
                            shared_rank: int = SHARED_RANK) -> dict:
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
        shared_rank : with duplicates dropped, the search runs at rank
            ``max(k, shared_rank)``, so that :meth:`id_scales` at that max_rank reads
            the same search (0: rank k, for a run without ID across scales)."""
        from ..metrics.intrinsic_dim import intrinsic_dimensions, twonn_ranked_from_distances

        nan = float("nan")
        empty = dict(id_twonn=nan, id_twonn_ml=nan, id_twonn_ml_low=nan, id_twonn_ml_high=nan, id_mle=nan, id_n=0)
        sample = self.samples.get(stack)
        if sample is None or len(sample) < 3:
            return empty
        results = self._id_cache.setdefault((stack, layer, view, k, discard_fraction, duplicates, shared_rank), {})
        if "id" not in results:
            distinct = duplicates == "drop"
            found = self._view_distances(stack, layer, view, max(k, shared_rank) if distinct else k,
                                         distinct)
            if found is None:
                results["id"] = empty
            else:
                points, dist = found
                dist = dist[:, :min(k, points.shape[0] - 1)]
                out = intrinsic_dimensions(distances=dist, k=k, discard_fraction=discard_fraction)
                if not distinct:
                    scale = float(torch.linalg.vector_norm(points.double() - points.double().mean(0), dim=1).mean())
                    try:
                        out["id_twonn"] = twonn_ranked_from_distances(dist, discard_fraction, scale=scale)
                    except EmbgeomError:
                        out["id_twonn"] = nan
                results["id"] = out
        return dict(results["id"])

    def id_scales(self, stack: str, layer: int, view: str, max_rank: int = SHARED_RANK):
        """GRIDE at every scale (DataFrame n1, n2, scale, id, id_err) on the position
        sample's distinct points of the view (the inliers view drops sampled positions
        above the layer's outlier limit); None without 3 distinct points."""
        from ..metrics.gride import gride_from_distances, gride_scales

        gride_scales(max_rank)  # checks max_rank
        sample = self.samples.get(stack)
        if sample is None or len(sample) < 3:
            return None
        results = self._id_cache.setdefault(("gride", stack, layer, view, max_rank), {})
        if "table" not in results:
            found = self._view_distances(stack, layer, view, max_rank, distinct=True)
            results["table"] = None if found is None else gride_from_distances(found[1], found[1].shape[1])
        table = results["table"]
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

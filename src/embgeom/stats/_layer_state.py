"""LayerStatistics' state: a plain dict that rebuilds the statistics exactly, and its
checks (a state that does not fit together is refused)."""
from __future__ import annotations

import torch

from .moments import Moments
from .position_sample import PositionSample
from .token_moments import TokenMoments
from . import _state
from ._layer_parts import LayerAccumulators, PairAccumulators
from ..errors import EmbgeomError


class LayerState:
    """Mixin of LayerStatistics: state_dict and from_state_dict."""

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
            "window_measures": self.window_measures,
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
                        cross_layer=False, window_measures=sd.get("window_measures", True))
            if not isinstance(stats.window_measures, bool) or not isinstance(sd.get("window_measures", True), bool):
                raise TypeError("window_measures must be True or False")
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

"""run.json's record of one analysis: versions, options, corpus, counts, model,
outlier calibration, k-NN searches, memory, snapshots, timings and warnings."""
from __future__ import annotations

import platform
import time
from dataclasses import asdict

import torch

from .. import __version__
from ..models import LoadedModel
from ..protocols import record as protocol_record
from ..stats.layers import LayerStatistics
from .config import AnalysisConfig
from .prepare import Counts


def _versions() -> dict:
    import numpy
    import pandas
    import transformers

    return {
        "embgeom": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
    }


def run_record(model, cfg: AnalysisConfig, facts, stats: LayerStatistics, *, revision, step, corpus_record: dict,
               counts: Counts, head: int, n_seen: dict, n_padded: int, planned_bytes: int, processes: int,
               resumed_from, snaps, timings: dict, t0: float, device, warnings_: list) -> dict:
    """The run's record (run.json) from what the analysis did; `timings`: seconds of
    each step, `t0`: the start of the run (perf_counter) for the total."""
    return {
        "versions": _versions(),
        "config": {**asdict(cfg), "model": str(model) if not isinstance(model, LoadedModel) else facts.path,
                   "revision": revision, "step": step},
        "protocol": protocol_record(asdict(cfg)),
        "corpus": corpus_record,
        "counts": {
            "windows": counts.windows,
            "documents": counts.documents,
            "tokens_counted": counts.tokens,
            "tokens_per_stack": n_seen,
            "token_types": counts.n_types,
            "padding_fraction": 1.0 - sum(n_seen.values()) / max(1, n_padded * len(n_seen)) if n_padded else 0.0,
        },
        "model": facts.to_dict(),
        "outliers": {
            "factor": cfg.outlier_factor,
            "calibration_windows": head,
            "calibration_tokens": stats.calibrated_on,
            "median_norm": stats.median_norm,
            "count": {s: [int(stats.outliers[s][l].moments.n) for l in range(L + 1)] for s, L in facts.n_layers.items()},
        },
        "knn": stats.knn_summary(),
        "accumulator_bytes": int(stats.nbytes),
        "planned_accumulator_bytes": int(planned_bytes),
        "processes": processes,
        "resumed_from_tokens": resumed_from,
        "snapshots": {"written": snaps.saved, "seconds": snaps.seconds, "every_s": snaps.every}
        if snaps is not None else None,
        "timings_s": {**timings, "total": time.perf_counter() - t0},
        "device": str(device),
        "warnings": warnings_,
        # What the covariance products were formed in (the state is float64 always).
        "precision": {"option": cfg.precision, "products": stats.products, "accumulation": "float64",
                      "tf32": False},
    }

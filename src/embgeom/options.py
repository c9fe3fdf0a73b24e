"""AnalysisConfig: every option of one analysis, checked, and --type-layers resolved
against a model's stacks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import EmbgeomError, option
from ..protocols import preset, resolve as resolve_protocol
from ..stats.moments import PRECISIONS


@dataclass
class AnalysisConfig:
    """Every option of one analysis (recorded in run.json)."""

    max_tokens: int | None = None
    seq_len: int | None = None  # None: min(DEFAULT_SEQ_LEN, the model's positions)
    batch_size: int = 16
    device: str = "auto"
    device_map: str | None = None
    dtype: str = "float32"
    id_sample: int = 10000
    token_types: str = "id"
    type_layers: tuple | None = None
    seed: int = 0
    exclude_special: bool = False
    exclude_positions: tuple = ()
    outlier_factor: float = 10.0
    text_field: str | None = None
    encoding_errors: str = "strict"
    min_count: int = 10
    max_count: int = 100000
    calibration_tokens: int = 2048
    # A preset of the options below (see `embgeom.protocols`); explicit options win.
    protocol: str = "embgeom"
    id_first: int = 0  # > 0: ID on the first N counted tokens of each layer, not a random sample
    twonn_discard: float = 0.1
    twonn_duplicates: str = "drop"  # or "keep-rank" (paper A's μ ≤ 1 + ε rule)
    types_filtered: bool = False  # Q, M, V, V_within, V_between over the types within the count bounds
    precision: str = "auto"
    cross_layer: bool = True

    @classmethod
    def from_options(cls, **options) -> "AnalysisConfig":
        """A checked configuration from keyword options (unknown names are an error).
        `protocol` fills in the options it sets that are not given explicitly."""
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise EmbgeomError(f"unknown option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**resolve_protocol(options))
        cfg.exclude_positions = tuple(int(p) for p in (cfg.exclude_positions or ()))
        if cfg.type_layers is not None:
            layers = (cfg.type_layers,) if isinstance(cfg.type_layers, (int, np.integer)) else tuple(cfg.type_layers)
            bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
            if bad or not layers:
                raise EmbgeomError(f"{option('type_layers')} takes layer numbers (negative: from the last), "
                                   f"got {cfg.type_layers!r}")
            cfg.type_layers = tuple(int(v) for v in layers)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive_int(name, v, allow_none=False):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise EmbgeomError(f"{option(name)} must be a positive integer, got {v!r}")

        positive_int("max_tokens", self.max_tokens, allow_none=True)
        positive_int("seq_len", self.seq_len, allow_none=True)
        positive_int("batch_size", self.batch_size)
        if isinstance(self.id_sample, bool) or not isinstance(self.id_sample, (int, np.integer)) or self.id_sample < 0:
            raise EmbgeomError(f"{option('id_sample')} must be a non-negative integer, got {self.id_sample!r}")
        if self.token_types not in ("id", "string", "none"):
            raise EmbgeomError(f"{option('token_types')} must be 'id', 'string' or 'none', got {self.token_types!r}")
        if self.type_layers is not None and self.token_types == "none":
            raise EmbgeomError(f"{option('type_layers')} chooses where per-type statistics are kept, but "
                               f"{option('token_types', 'none')} keeps none; drop one of the two")
        if not (isinstance(self.outlier_factor, (int, float)) and math.isfinite(self.outlier_factor) and self.outlier_factor > 1):
            raise EmbgeomError(f"{option('outlier_factor')} must be a number greater than 1, got {self.outlier_factor!r}")
        if self.encoding_errors not in ("strict", "replace", "ignore"):
            raise EmbgeomError(f"{option('encoding_errors')} must be strict, replace or ignore, got {self.encoding_errors!r}")
        if self.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
            raise EmbgeomError(f"{option('device_map')} must be auto, balanced, balanced_low_0 or sequential, "
                               f"got {self.device_map!r}")
        if self.precision not in PRECISIONS:
            raise EmbgeomError(f"{option('precision')} must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.cross_layer, bool):
            raise EmbgeomError(f"{option('cross_layer')} must be True or False, got {self.cross_layer!r}")
        if self.min_count < 1 or self.max_count < self.min_count:
            raise EmbgeomError(f"{option('min_count')}/{option('max_count')} must satisfy 1 <= min <= max, "
                               f"got {self.min_count}, {self.max_count}")
        self._validate_protocol()

    def _validate_protocol(self) -> None:
        preset(self.protocol)  # a known name
        if isinstance(self.id_first, bool) or not isinstance(self.id_first, (int, np.integer)) or self.id_first < 0:
            raise EmbgeomError(f"{option('id_first')} must be a non-negative integer (0: a random sample), got {self.id_first!r}")
        d = self.twonn_discard
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise EmbgeomError(f"{option('twonn_discard')} must be a fraction in [0, 1), got {d!r}")
        if self.twonn_duplicates not in ("drop", "keep-rank"):
            raise EmbgeomError(f"{option('twonn_duplicates')} must be 'drop' or 'keep-rank', got {self.twonn_duplicates!r}")
        if not isinstance(self.types_filtered, (bool, np.bool_)):
            raise EmbgeomError(f"{option('types_filtered')} must be True or False, got {self.types_filtered!r}")
        if self.types_filtered and self.token_types == "none":
            raise EmbgeomError(f"{option('types_filtered')} takes Q, M, V over the token types within the count bounds, "
                               f"but {option('token_types', 'none')} keeps no types; drop one of the two")

    @property
    def id_points(self) -> int:
        """Positions kept for intrinsic dimension: --id-first if set, else --id-sample."""
        return int(self.id_first or self.id_sample)


def resolve_type_layers(type_layers: tuple | None, n_layers: dict) -> dict | None:
    """{stack: layers keeping per-type statistics} from --type-layers (negative
    numbers count from the last hidden state, -1 being the last); None: all."""
    if type_layers is None:
        return None
    out = {}
    for stack, L in n_layers.items():
        chosen = set()
        for v in type_layers:
            if not -(L + 1) <= v <= L:
                raise EmbgeomError(f"{option('type_layers', v)} is not a layer of this model's {stack} (0 to {L}, "
                                   f"or -1 to -{L + 1} counting from the last)")
            chosen.add(v % (L + 1))
        out[stack] = tuple(sorted(chosen))
    return out

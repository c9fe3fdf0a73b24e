"""AnalysisConfig: every option of one analysis, declared once (name, type, default
and help), checked, and --type-layers resolved against a model's stacks.

The command line builds `embgeom run`'s analysis options from these fields and
`analyze` documents them through them, so this module imports neither torch nor
typer.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import EmbgeomError, option
from .protocols import preset, resolve as resolve_protocol

PRECISIONS = ("auto", "float64")  # of the covariance products (see embgeom.stats.moments)


def _opt(default, help: str, *, flag: str | None = None, preset: bool = False, repeat: bool = False):
    """A field with its command-line description. `flag`: the flag(s) if not
    --name-with-dashes (a boolean pair as "--on/--off"); `preset`: set by --protocol,
    so the command line passes it only when given (its default there is None);
    `repeat`: a repeatable flag of integers gathered into a tuple."""
    return field(default=default, metadata={"help": help, "flag": flag, "preset": preset, "repeat": repeat})


@dataclass
class AnalysisConfig:
    """Every option of one analysis (recorded in run.json), each field with its help.

    Declared once, here: `embgeom.analyze`'s keyword options, `embgeom run`'s flags
    and the lists of options in the docs are read off these fields. `protocol` presets
    how paper A (Razzhigaev et al., EACL 2024 Findings) or paper B (Yamagiwa &
    Shimodaira, COLING 2025) computed their numbers; options given beside it win.
    `calibration_tokens` (not an option of the command line): the outlier threshold
    (outlier_factor x the median norm) is calibrated on the first windows that hold
    that many counted tokens.

    >>> from embgeom import AnalysisConfig
    >>> cfg = AnalysisConfig.from_options(protocol="paper-a", batch_size=8)
    >>> cfg.id_first, cfg.twonn_discard, cfg.twonn_duplicates, cfg.batch_size
    (4096, 0.8, 'keep-rank', 8)
    """

    max_tokens: int | None = _opt(None, "Stop after this many counted tokens.")
    seq_len: int | None = _opt(None, "Window length in tokens, special tokens included (default: 512, or the "
                                     "model's positions if fewer).")
    batch_size: int = _opt(16, "Windows per forward pass.")
    device: str = _opt("auto", "auto, cpu or cuda (under torchrun: each rank's own GPU).")
    device_map: str | None = _opt(None, "auto: spread a model too large for one device over all devices "
                                        "(accelerate).")
    dtype: str = _opt("float32", "float32, bfloat16 or float16 (statistics are float64).")
    id_sample: int = _opt(10000, "Token positions sampled for intrinsic dimension.")
    token_types: str = _opt("id", "id (vocabulary id; the default), string (surface form), or none: no per-type "
                                  "statistics, so memory stays constant however many types a long run meets. "
                                  "--protocol paper-b sets string.", preset=True)
    type_layers: tuple | None = _opt(None, "Keep per-type statistics only at these layers (0 = embeddings; "
                                           "-1 = last); repeatable. Per-type tables hold d float64 per type and "
                                           "layer, most of a long run's memory on a big model.", repeat=True)
    seed: int = _opt(0, "Seed of the sampled positions for intrinsic dimension (the same positions in every "
                        "layer, whatever the batching or ranks).")
    exclude_special: bool = _opt(False, "Do not count special tokens.")
    exclude_positions: tuple = _opt((), "Window positions not counted (0 = first; -1 = last); repeatable.",
                                    repeat=True)
    outlier_factor: float = _opt(10.0, "Inliers: norm <= factor x median norm.")
    text_field: str | None = _opt(None, "Text column/field of .jsonl/.csv/.parquet/datasets.")
    encoding_errors: str = _opt("strict", "strict, replace or ignore invalid UTF-8.")
    min_count: int = _opt(10, "Norm-variance trade-off over token types seen at least this often...")
    max_count: int = _opt(100000, "...and at most this often.")
    calibration_tokens: int = 2048  # not an option of the command line
    # A preset of the options below (see `embgeom.protocols`); explicit options win.
    protocol: str = _opt("embgeom", "embgeom, paper-a or paper-b: a preset of --id-first, --twonn-discard, "
                                    "--twonn-duplicates, --token-types and --types-filtered that reproduces how "
                                    "each paper computed its numbers (paper-a: ID on the first 4096 counted "
                                    "tokens, 20% of the TwoNN ratios kept, mu <= 1+1e-8 left out but ranked; "
                                    "paper-b: string types, Q/M/V over the types within --min-count/--max-count). "
                                    "Any of those options given explicitly overrides the preset.")
    id_first: int = _opt(0, "Intrinsic dimension on the first N counted tokens of each layer (the same tokens in "
                            "every layer) instead of --id-sample random positions; 0: the random sample (the "
                            "default; paper-a sets 4096).", preset=True)
    twonn_discard: float = _opt(0.1, "TwoNN: fraction of the largest ratios r2/r1 left out of the fit (default "
                                     "0.1; paper-a sets 0.8).", preset=True)
    twonn_duplicates: str = _opt("drop", "TwoNN: drop (points at distance 0 from their nearest neighbour dropped "
                                         "before ranking; the default) or keep-rank (points with mu <= 1+1e-8 left "
                                         "out of the fit but keeping their ranks, as paper A; paper-a sets it).",
                                 preset=True)
    types_filtered: bool = _opt(False, "Layer-level Q, M, V, V_within, V_between over the tokens of the types "
                                       "with --min-count <= n_t <= --max-count only (paper-b sets it), or over "
                                       "every token (the default).", flag="--types-filtered/--all-types",
                                preset=True)
    precision: str = _opt("auto", "auto: each batch's covariance products in float32 (IEEE, no TF32), on data "
                                  "centred by a reference row, accumulated in float64; float64: every product in "
                                  "float64 (slower).")
    cross_layer: bool = _opt(True, "Float64 cross-moments of consecutive layers for linear_cka and linearity "
                                   "(2 x width² per layer pair); without them both are "
                                   "NaN.", flag="--cross-layer/--no-cross-layer")
    window_measures: bool = _opt(True, "Per-window curvature and prompt entropy (one eigendecomposition per window "
                                       "and layer, of a min(window, width)-sided Gram); without them both are NaN.",
                                 flag="--window-measures/--no-window-measures")
    gride_max_rank: int = _opt(64, "ID across scales (GRIDE, id_scale.parquet): the largest neighbour rank n2, "
                                   "scales n1 = 1, 2, 4, ... with n2 = 2 x n1 <= it; one k-NN search of this rank "
                                   "per layer serves it and every id_* column. 0: no ID across scales, and a "
                                   "rank-20 search (what MLE needs) instead.")

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
        if not isinstance(self.window_measures, bool):
            raise EmbgeomError(f"{option('window_measures')} must be True or False, got {self.window_measures!r}")
        r = self.gride_max_rank
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0 or r == 1:
            raise EmbgeomError(f"{option('gride_max_rank')} must be 0 (no ID across scales) or an integer >= 2, "
                               f"got {r!r}")
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


def options() -> list:
    """The fields that are options of `analyze` and `embgeom run` (those with help)."""
    return [f for f in fields(AnalysisConfig) if "help" in f.metadata]


def flag(f) -> str:
    """The command-line flag of option field `f` ("--on/--off" for a boolean pair)."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def option_docs(indent: str = "    ") -> str:
    """An "Options" section listing every option with its flag, default and help,
    for the docstrings of AnalysisConfig and `analyze`."""
    lines = ["", f"{indent}Options", f"{indent}-------"]
    for f in options():
        lines.append(f"{indent}{f.name} : default {f.default!r} (command line: {flag(f)})")
        lines += textwrap.wrap(f.metadata["help"], 88, initial_indent=indent * 2, subsequent_indent=indent * 2,
                               break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines) + "\n"


if AnalysisConfig.__doc__:  # None under python -OO
    AnalysisConfig.__doc__ += "\n" + option_docs()


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

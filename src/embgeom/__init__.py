"""embgeom: exact streaming geometry of transformer hidden states."""
__version__ = "0.1.0"

from .errors import EmbgeomError

# The public names, imported on first use (PEP 562): `import embgeom` and the
# command line's --help need not import torch, pandas or transformers.
_EXPORTS = {
    "AnalysisConfig": ".pipeline",
    "analyze": ".pipeline",
    "GeometryCallback": ".callback",
    "GeometryProbe": ".callback",
    "Result": ".results",
    "save_run": ".output",
    "Moments": ".stats.moments",
    "TokenMoments": ".stats.token_moments",
    "anisotropy": ".metrics.spectrum",
    "curvature": ".metrics.trajectory",
    "gride": ".metrics.gride",
    "gride_plateau": ".metrics.gride",
    "linear_cka": ".metrics.cross_layer",
    "linearity": ".metrics.cross_layer",
    "prompt_entropy": ".metrics.trajectory",
    "mle_id": ".metrics.intrinsic_dim",
    "twonn": ".metrics.intrinsic_dim",
    "twonn_ml": ".metrics.intrinsic_dim",
}

__all__ = ["EmbgeomError", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'embgeom' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

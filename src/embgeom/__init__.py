"""embgeom: exact streaming geometry of transformer hidden states."""
__version__ = "0.1.0"

from .errors import EmbgeomError
from .metrics.intrinsic_dim import mle_id, twonn, twonn_ml
from .metrics.spectrum import anisotropy
from .pipeline import AnalysisConfig, analyze
from .results import Result
from .stats.moments import Moments
from .stats.token_moments import TokenMoments

__all__ = [
    "AnalysisConfig",
    "EmbgeomError",
    "Moments",
    "Result",
    "TokenMoments",
    "analyze",
    "anisotropy",
    "mle_id",
    "twonn",
    "twonn_ml",
]

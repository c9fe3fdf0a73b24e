"""AnalysisConfig, declared in `embgeom.options` (which the command line reads
without importing torch)."""
from ..options import AnalysisConfig, resolve_type_layers

__all__ = ["AnalysisConfig", "resolve_type_layers"]

"""embgeom."""
__version__ = "0.1.0"

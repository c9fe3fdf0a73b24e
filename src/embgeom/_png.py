"""How every figure goes to disk: one PNG setting, one save (plots.py and
plots_training.py both draw through it)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

# zlib level 1 instead of the default 6: compressing is a large share of the time a
# figure takes to save, and level 1 makes files only slightly larger.
PNG = {"dpi": 110, "pil_kwargs": {"compress_level": 1}}


def save_png(fig, path: Path, rect=None) -> Path:
    """Lay out `fig` (within `rect`, left bottom right top in figure fractions: room
    left for a legend below it), write it to `path` and free it."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, **PNG)
    plt.close(fig)
    return path

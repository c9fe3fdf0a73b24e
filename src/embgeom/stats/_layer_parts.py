"""The accumulators of one (stack, layer) and of one pair of consecutive layers, the
batches held back before calibration, and the error for non-finite hidden states."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cross_moments import CrossMoments
from .moments import Moments
from .token_moments import TokenMoments
from ..errors import EmbgeomError

VIEWS = ("all", "inliers")
# Per (layer, view) sums over windows: curvature sum and count, prompt entropy sum and count.
WINDOW_SUMS = 4


@dataclass
class PairAccumulators:
    """Cross-moments of one pair of consecutive layers (l, l + 1) of a stack.

    both : the tokens that are inliers at both layers (the pair's inliers view).
    rest : every other token (outlier at one layer or both); all = both ⊕ rest.
    drop_x : layer l's vectors of the tokens inlier at l but outlier at l + 1, and
    drop_y : layer l + 1's of those inlier at l + 1 but outlier at l: taken out of
        each layer's inlier moments, they leave the moments of `both`'s tokens.
    """

    both: CrossMoments
    rest: CrossMoments
    drop_x: Moments
    drop_y: Moments

    @classmethod
    def new(cls, dx, dy, device, precision="auto"):
        return cls(CrossMoments(dx, dy, device, precision), CrossMoments(dx, dy, device, precision),
                   Moments(dx, device=device, precision=precision), Moments(dy, device=device, precision=precision))

    def parts(self):
        return (self.both, self.rest, self.drop_x, self.drop_y)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).state_dict() for k in ("both", "rest", "drop_x", "drop_y")}

    @classmethod
    def from_state_dict(cls, sd: dict, device=None):
        return cls(CrossMoments.from_state_dict(sd["both"], device), CrossMoments.from_state_dict(sd["rest"], device),
                   Moments.from_state_dict(sd["drop_x"], device), Moments.from_state_dict(sd["drop_y"], device))

    def merge(self, other: "PairAccumulators") -> None:
        for a, b in zip(self.parts(), other.parts()):
            a.merge(b)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts())

    @staticmethod
    def nbytes_for(dx: int, dy: int) -> int:
        """Upper bound: every part allocated (the last three only meet outliers)."""
        return 2 * CrossMoments.nbytes_for(dx, dy) + Moments.nbytes_for(dx) + Moments.nbytes_for(dy)


@dataclass
class LayerAccumulators:
    """Accumulators of one (stack, layer) for one part (inliers or outliers)."""

    moments: Moments
    types: TokenMoments | None

    @classmethod
    def new(cls, width, device, with_types, capacity=0, precision="auto"):
        return cls(Moments(width, device=device, precision=precision), TokenMoments(width, device=device, capacity=capacity) if with_types else None)

    def update(self, x: torch.Tensor, groups) -> None:
        self.moments.update(x)
        if self.types is not None:
            self.types.update(x, groups)

    def merged_with(self, other: "LayerAccumulators") -> "LayerAccumulators":
        m = Moments.from_state_dict(self.moments.state_dict()).merge(other.moments)
        t = None
        if self.types is not None:
            t = TokenMoments.from_state_dict(self.types.state_dict()).merge(other.types)
        return LayerAccumulators(m, t)

    @property
    def nbytes(self) -> int:
        return self.moments.nbytes + (self.types.nbytes if self.types is not None else 0)


@dataclass
class _Pending:
    """Counted vectors held back until the outlier threshold is calibrated."""

    xs: list = field(default_factory=list)  # per batch: list over layers of (n, d)
    types: list = field(default_factory=list)
    meta: list = field(default_factory=list)
    calib: list = field(default_factory=list)  # per batch: (n,) bool rows the median is taken over, or None (all)
    lengths: list = field(default_factory=list)  # per batch: (B,) counted rows of each window
    n: int = 0


class NonFiniteHidden(EmbgeomError):
    """Hidden states with NaN or inf (the caller, who knows the dtype, adds the fix)."""

    def __init__(self, stack: str, layer: int):
        super().__init__(f"hidden states of {stack} layer {layer} are not finite (NaN or inf)")
        self.stack, self.layer = stack, layer

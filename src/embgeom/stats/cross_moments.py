"""`CrossMoments`: exact streaming cross-covariance of two representations of the
same vectors (a token at two consecutive layers).

Keeps, in float64, the count, both means and the cross scatter Σ (x − μ_x)(y − μ_y)ᵀ
(d_x × d_y, so layers of different widths pair up). Each batch is centred on its
own means and merged with the parallel update of Chan, Golub & LeVeque (1979), as
`Moments` does for the Gram: the cross scatter of a union is the sum of the parts'
plus (n₁n₂/n) δ_x δ_yᵀ. Accumulators merge exactly, so shards and ranks combine.
"""
from __future__ import annotations

import numpy as np
import torch

from .moments import NonFiniteInput
from ..errors import EmbgeomError


class CrossMoments:
    """Streaming, mergeable cross-moments of pairs of vectors (x ∈ R^dx, y ∈ R^dy)."""

    VERSION = 1

    def __init__(self, dim_x: int, dim_y: int, device=None):
        self.dim_x, self.dim_y = int(dim_x), int(dim_y)
        self.n = 0
        self._device = torch.device(device) if device is not None else None
        self._mean_x = self._mean_y = self._cross = None

    def _init_state(self, device) -> None:
        self._device = torch.device(device)
        z = dict(dtype=torch.float64, device=self._device)
        self._mean_x = torch.zeros(self.dim_x, **z)
        self._mean_y = torch.zeros(self.dim_y, **z)
        self._cross = torch.zeros(self.dim_x, self.dim_y, **z)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "CrossMoments":
        """Add a batch of pairs: x (n, dx) and y (n, dy), row i of each the same token."""
        if x.shape[0] != y.shape[0] or x.shape[1:] != (self.dim_x,) or y.shape[1:] != (self.dim_y,):
            raise EmbgeomError(f"CrossMoments({self.dim_x}, {self.dim_y}).update got shapes "
                               f"{tuple(x.shape)} and {tuple(y.shape)}")
        nb = x.shape[0]
        if nb == 0:
            return self
        if self._cross is None:
            self._init_state(self._device if self._device is not None else x.device)
        bx, xc = centred(x, self._device)
        by, yc = centred(y, self._device)
        return self.update_centred(bx, xc, by, yc)

    def update_centred(self, mean_x, xc, mean_y, yc) -> "CrossMoments":
        """Add a batch given as its float64 means and rows centred on them (from
        `centred`), so a layer shared by two pairs is converted once."""
        if xc.shape[0] == 0:
            return self
        if self._cross is None:
            self._init_state(self._device if self._device is not None else xc.device)
        self._fold(xc.shape[0], mean_x, mean_y, torch.mm(xc.T, yc))
        return self

    def _fold(self, nb: int, bx, by, cross) -> None:
        n = self.n + nb
        dx, dy = bx - self._mean_x, by - self._mean_y
        self._cross.add_(cross)
        if self.n:
            self._cross.addr_(dx, dy, alpha=self.n * nb / n)
        self._mean_x.add_(dx, alpha=nb / n)
        self._mean_y.add_(dy, alpha=nb / n)
        self.n = n

    def merge(self, other: "CrossMoments") -> "CrossMoments":
        """Merge another accumulator into this one, exactly; returns self."""
        if not isinstance(other, CrossMoments) or (other.dim_x, other.dim_y) != (self.dim_x, self.dim_y):
            raise EmbgeomError("can only merge a CrossMoments of the same widths")
        if other.n == 0:
            return self
        if self._cross is None:
            self._init_state(self._device if self._device is not None else other._device)
        dev = self._device
        self._fold(other.n, other._mean_x.to(dev), other._mean_y.to(dev), other._cross.to(dev))
        return self

    def copy(self) -> "CrossMoments":
        return CrossMoments.from_state_dict(self.state_dict(), device=self._device)

    @property
    def cross_scatter(self) -> np.ndarray:
        """Σ (x − μ_x)(y − μ_y)ᵀ, float64 (dx, dy)."""
        if self.n == 0:
            raise EmbgeomError("CrossMoments.cross_scatter needs at least one pair; none was added")
        return self._cross.detach().cpu().numpy()

    def state_dict(self) -> dict:
        sd = {"kind": "CrossMoments", "version": self.VERSION, "dim_x": self.dim_x, "dim_y": self.dim_y,
              "n": self.n}
        if self._cross is not None:
            sd.update(mean_x=self._mean_x.detach().cpu().clone(), mean_y=self._mean_y.detach().cpu().clone(),
                      cross=self._cross.detach().cpu().clone())
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, device=None) -> "CrossMoments":
        if not isinstance(sd, dict) or sd.get("kind") != "CrossMoments":
            raise EmbgeomError("not a CrossMoments state_dict (missing kind='CrossMoments')")
        if sd.get("version") != cls.VERSION:
            raise EmbgeomError(f"CrossMoments state_dict version {sd.get('version')!r} is not {cls.VERSION}; "
                               "rerun without --resume")
        m = cls(sd["dim_x"], sd["dim_y"], device=device)
        m.n = int(sd["n"])
        if "cross" in sd:
            m._init_state(device if device is not None else "cpu")
            m._mean_x.copy_(sd["mean_x"])
            m._mean_y.copy_(sd["mean_y"])
            m._cross.copy_(sd["cross"])
        return m

    @property
    def nbytes(self) -> int:
        return 0 if self._cross is None else self.nbytes_for(self.dim_x, self.dim_y)

    @staticmethod
    def nbytes_for(dim_x: int, dim_y: int) -> int:
        return 8 * (dim_x * dim_y + dim_x + dim_y)


def centred(x: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rows − mean) of a batch, in float64 on `device` (default: x's)."""
    x64 = x.detach().to(device if device is not None else x.device, torch.float64)
    mean = x64.mean(0)
    if not bool(torch.isfinite(mean).all()):
        raise NonFiniteInput("batch holds NaN or infinite values")
    # Centred in place only on a copy of our own: never in the caller's storage.
    return mean, x64.sub_(mean) if x64.data_ptr() != x.data_ptr() else x64 - mean


def scatter_without(n: int, mean: np.ndarray, scatter: np.ndarray, n_part: int, mean_part: np.ndarray,
                    scatter_part: np.ndarray) -> np.ndarray:
    """The scatter matrix of a set with one of its parts taken out (Chan et al. run
    backwards): S_rest = S − S_part − (n_rest n_part / n) δδᵀ, δ = μ_rest − μ_part,
    μ_rest = (n μ − n_part μ_part) / n_rest. Exact when the part is small, as here
    (the few tokens that are outliers in a neighbouring layer only)."""
    n_rest = n - n_part
    if n_part == 0:
        return scatter
    if n_rest <= 0:
        raise EmbgeomError("cannot take every vector out of a scatter matrix")
    mean_rest = (n * mean - n_part * mean_part) / n_rest
    delta = mean_rest - mean_part
    return scatter - scatter_part - (n_rest * n_part / n) * np.outer(delta, delta)

"""`CrossMoments`: exact streaming cross-covariance of two representations of the
same vectors (a token at two consecutive layers).

Keeps, in float64, the count, both means and the cross scatter Σ (x − μ_x)(y − μ_y)ᵀ
(d_x × d_y, so layers of different widths pair up). Batches are merged with the
parallel update of Chan, Golub & LeVeque (1979), as `Moments` does for the Gram:
the cross scatter of a union is the sum of the parts' plus (n₁n₂/n) δ_x δ_yᵀ.
Accumulators merge exactly, so shards and ranks combine.

Precision of the per-batch product follows `Moments`: under "auto" a batch in model
precision (float32, bfloat16, float16) is centred on a float32 reference row (its
own mean, roughly) and x̃ᵀỹ is formed in IEEE float32; the float64 algebra then
takes off the rows' residual mean exactly: Σ x̃ỹᵀ − n x̄̃ ȳ̃ᵀ. float64 inputs, and
``precision="float64"``, keep the product in float64.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from . import _state
from .moments import NonFiniteInput, check_precision, product_dtype
from .._hardware import ieee_fp32_matmul
from ..errors import EmbgeomError


class Centred(NamedTuple):
    """One batch of one side of a pair: `rows` is the batch minus a reference row,
    in the dtype its product is formed in; `mean` is the batch's float64 mean and
    `offset` the float64 mean of `rows` (mean − reference; zero when the reference
    is the float64 mean itself)."""

    mean: torch.Tensor
    offset: torch.Tensor
    rows: torch.Tensor


def centred(x: torch.Tensor, device=None, precision: str = "auto") -> Centred:
    """A batch of vectors prepared for `CrossMoments.update_centred`, on `device`
    (default: x's): centred on a float32 reference row when its products may be
    float32 (model-precision input under "auto"), on its float64 mean otherwise."""
    x = x.detach().to(device if device is not None else x.device)
    nb = x.shape[0]
    if nb == 0:
        zero = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        return Centred(zero, zero, x.to(torch.float64))
    if product_dtype(precision, x.dtype) == torch.float32 and nb:
        ref32 = x.sum(0, dtype=torch.float32).div_(nb)
        rows = torch.sub(x, ref32)
        offset = rows.sum(0, dtype=torch.float64).div_(nb)
        if bool(torch.isfinite(offset).all()) and bool(torch.isfinite(ref32).all()):
            return Centred(ref32.to(torch.float64).add_(offset), offset, rows)
    x64 = x.to(torch.float64)
    mean = x64.mean(0)
    if not bool(torch.isfinite(mean).all()):
        raise NonFiniteInput("batch holds NaN or infinite values")
    # Centred in place only on a copy of our own: never in the caller's storage.
    rows = x64.sub_(mean) if x64.data_ptr() != x.data_ptr() else x64 - mean
    return Centred(mean, torch.zeros_like(mean), rows)


def _cross_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀb in float64: formed in IEEE float32 when both sides are float32 (and
    again in float64 should float32 overflow on finite rows)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        with ieee_fp32_matmul():
            c = torch.mm(a.T, b)
        if bool(torch.isfinite(c).all()):
            return c.to(torch.float64)
    return torch.mm(a.T.to(torch.float64), b.to(torch.float64))


class CrossMoments:
    """Streaming, mergeable cross-moments of pairs of vectors (x ∈ R^dx, y ∈ R^dy).

    Parameters
    ----------
    dim_x, dim_y : widths of the two sides.
    device : where the float64 state lives (default: the first batch's device).
    precision : {"auto", "float64"}: the per-batch product's precision (module
        docstring); the state is float64 either way.

    Example
    -------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(100, 3, generator=g, dtype=torch.float64)
    >>> c = CrossMoments(3, 3).update(x, 2 * x)
    >>> bool(torch.allclose(torch.from_numpy(c.cross_scatter), 2 * (x - x.mean(0)).T @ (x - x.mean(0))))
    True
    """

    VERSION = 1

    def __init__(self, dim_x: int, dim_y: int, device=None, precision: str = "auto"):
        self.dim_x, self.dim_y = int(dim_x), int(dim_y)
        self.precision = check_precision(precision)
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
        if x.shape[0] == 0:
            return self
        if self._cross is None:
            self._init_state(self._device if self._device is not None else x.device)
        return self.update_centred(centred(x, self._device, self.precision),
                                   centred(y, self._device, self.precision))

    def update_centred(self, x: Centred, y: Centred) -> "CrossMoments":
        """Add a batch given as both sides' `centred` forms, so that a layer shared
        by two pairs is prepared once."""
        nb = x.rows.shape[0]
        if nb == 0:
            return self
        if self._cross is None:
            self._init_state(self._device if self._device is not None else x.rows.device)
        cross = _cross_product(x.rows, y.rows).addr_(x.offset, y.offset, alpha=-float(nb))
        self._fold(nb, x.mean, y.mean, cross)
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

    def to(self, device) -> "CrossMoments":
        """Move the state to `device` in place; returns self."""
        self._device = torch.device(device)
        if self._cross is not None:
            self._mean_x, self._mean_y, self._cross = (t.to(self._device)
                                                       for t in (self._mean_x, self._mean_y, self._cross))
        return self

    @property
    def cross_scatter(self) -> np.ndarray:
        """Σ (x − μ_x)(y − μ_y)ᵀ, float64 (dx, dy)."""
        if self.n == 0:
            raise EmbgeomError("CrossMoments.cross_scatter needs at least one pair; none was added")
        return self._cross.detach().cpu().numpy()

    def state_dict(self) -> dict:
        sd = {"kind": "CrossMoments", "version": self.VERSION, "dim_x": self.dim_x, "dim_y": self.dim_y,
              "n": self.n, "precision": self.precision}
        if self._cross is not None:
            sd.update(mean_x=self._mean_x.detach().cpu().clone(), mean_y=self._mean_y.detach().cpu().clone(),
                      cross=self._cross.detach().cpu().clone())
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, device=None) -> "CrossMoments":
        """Rebuild an accumulator from ``state_dict()`` exactly, on `device` (default
        CPU); a state no accumulator could have written is refused (EmbgeomError)."""
        k = "CrossMoments"
        _state.check_kind(sd, k, versions=(cls.VERSION,))
        dx = _state.count(_state.entry(sd, k, "dim_x"), k, "dim_x", low=1)
        dy = _state.count(_state.entry(sd, k, "dim_y"), k, "dim_y", low=1)
        m = cls(dx, dy, device=device, precision=sd.get("precision", "auto"))
        m.n = _state.count(_state.entry(sd, k, "n"), k, "n")
        if "cross" in sd or m.n:
            mean_x = _state.tensor(_state.entry(sd, k, "mean_x"), k, "mean_x", (dx,))
            mean_y = _state.tensor(_state.entry(sd, k, "mean_y"), k, "mean_y", (dy,))
            cross = _state.tensor(_state.entry(sd, k, "cross"), k, "cross", (dx, dy))
            m._init_state(device if device is not None else "cpu")
            m._mean_x.copy_(mean_x)
            m._mean_y.copy_(mean_y)
            m._cross.copy_(cross)
        return m

    @property
    def nbytes(self) -> int:
        return 0 if self._cross is None else self.nbytes_for(self.dim_x, self.dim_y)

    @staticmethod
    def nbytes_for(dim_x: int, dim_y: int) -> int:
        return 8 * (dim_x * dim_y + dim_x + dim_y)


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

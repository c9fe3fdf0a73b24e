"""`Moments`: exact streaming first and second moments of a cloud of vectors.

Keeps, in float64, the count, the mean, the scatter matrix Σ (x − μ)(x − μ)ᵀ and the
sum of unit vectors. Each batch is centred on its own mean and merged with the
parallel update of Chan, Golub & LeVeque (1979), so far-from-origin data with a tiny
spread lose nothing (no difference of large raw sums). The batch's Gram matrix is
added straight into the upper triangle of the state, one matrix product per row
strip. Memory is O(d²) whatever the number of vectors; accumulators merge exactly,
so shards and ranks combine.

Precision of the per-batch products (``precision``): with "auto" (the default), a
batch in model precision (float32, bfloat16, float16) is centred on a reference row
(its own mean, roughly, held in float32) and its Gram matrix, sums and unit-vector
sum are formed in float32 (IEEE: no TF32 or bf16 shortcuts, on every device); each
batch's results are then turned into float64, the reference row added back
exactly, and merged into the float64 state with the same Chan update. Centring
first is what keeps float32 exact enough: the products see the spread of the data,
not its offset. float64 inputs, and ``precision="float64"``, keep every product in
float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._hardware import ieee_fp32_matmul
from .._validate import as_float_matrix
from ..errors import EmbgeomError
from ..options import PRECISIONS
from . import _state
from .gram import _gram_work, add_gram_upper, symmetric_from_upper
from ..metrics.spectrum import eigenvalues, spectrum_metrics, top_eigenvalue

# Dtypes models emit: their batches get float32 products under "auto".
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EmbgeomError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def product_dtype(precision: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a batch of `dtype` forms its products in: float32 for model
    precision under "auto", float64 otherwise (float64 inputs, precision="float64")."""
    return torch.float32 if precision == "auto" and dtype in MODEL_DTYPES else torch.float64


# Largest vector norm accepted: the float64 sums of squares (n up to 1e12 vectors)
# must stay far from overflow (1.8e308).
MAX_NORM = 1e140


class NonFiniteInput(EmbgeomError):
    """A batch held NaN or infinite values."""


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


class Moments:
    """Streaming, mergeable moments of vectors in R^d: the Q, M, V and spectrum columns.

    Parameters
    ----------
    dim : int
        Width d of the vectors.
    device : str or torch.device, optional
        Where the float64 state lives; batches are moved there. Defaults to the
        device of the first batch.
    precision : {"auto", "float64"}
        "auto": batches in model precision (float32, bfloat16, float16) form their
        products in float32 after centring on the reference row, float64 batches in
        float64; "float64": every product in float64. The state is float64 either way.

    Attributes (float64, population normalisation 1/N)
    ----------
    n : number of vectors seen.
    mean : μ = (1/N) Σ x.
    Q : (1/N) Σ ‖x‖² (computed as M + V, both non-negative, so no cancellation).
    M : ‖μ‖².
    V : (1/N) Σ ‖x − μ‖², the trace of the covariance.
    covariance : (1/N) Σ (x − μ)(x − μ)ᵀ.
    second_moment : (1/N) Σ x xᵀ = covariance + μμᵀ.

    A batch is folded in, and two accumulators merged, by the pairwise update: scatter
    of the union = both scatters + (n₁n₂/n) δδᵀ, δ the difference of the means
    (float64 state: the batching changes only the rounding).

    References: T. F. Chan, G. H. Golub, R. J. LeVeque (1983), "Algorithms for
    computing the sample variance: analysis and recommendations", The American
    Statistician 37(3) (the update); H. Yamagiwa, H. Shimodaira (2025), "Norm of Mean
    Contextualized Embeddings Determines their Variance", COLING (Q = M + V).

    >>> import numpy as np
    >>> from embgeom import Moments
    >>> x = np.random.default_rng(0).normal(size=(1000, 4)) + 2.0
    >>> m = Moments(4).update(x[:600]).update(x[600:])  # two batches: as one
    >>> m.n, round(m.Q, 3), round(m.M, 3), round(m.V, 3)
    (1000, 19.746, 15.762, 3.984)
    >>> round(float(x.var(axis=0).sum()), 3)  # V: the trace of the covariance
    3.984
    """

    def __init__(self, dim: int, device=None, precision: str = "auto"):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise EmbgeomError(f"Moments(dim) needs a positive integer width, got {dim!r}")
        self.dim = int(dim)
        self.n = 0
        self.n_nonzero = 0  # vectors with ‖x‖ > 0, the ones that have a direction
        self._device = torch.device(device) if device is not None else None
        self._mean = None
        self._scatter = None
        self._unit_sum = None
        self.precision = check_precision(precision)
        self.products: set = set()  # dtypes the products were formed in, for the run record

    # ------------------------------------------------------------------ updates
    def _init_state(self, device) -> None:
        self._device = torch.device(device)
        z = dict(dtype=torch.float64, device=self._device)
        self._mean = torch.zeros(self.dim, **z)
        self._scatter = torch.zeros(self.dim, self.dim, **z)
        self._unit_sum = torch.zeros(self.dim, **z)

    def update(self, batch) -> "Moments":
        """Add a batch of vectors: (n, d) numpy array or torch tensor, any float dtype."""
        x = as_float_matrix(batch, "batch", dim=self.dim)
        nb = x.shape[0]
        if nb == 0:
            return self
        if self._mean is None:
            self._init_state(self._device if self._device is not None else x.device)
        if product_dtype(self.precision, x.dtype) == torch.float32 and self._update_float32(x.detach()):
            self.products.add("float32")
            return self
        self.products.add("float64")
        # One float64 copy of the batch (on the state's device) with a spare last row.
        # Centred on the batch's own mean, its Gram matrix goes straight into the
        # state; the spare row carries the Chan cross term, so the Gram adds it too
        # (no separate rank-1 update). The batch mean and the sum of unit vectors are
        # matrix-vector products (BLAS gemv reads the copy faster than a reduction;
        # a two-row product is slower still). A compiled single pass was tried: on
        # CPU it is slower than these multi-threaded passes.
        buf = torch.empty(nb + 1, self.dim, dtype=torch.float64, device=self._device)
        x64 = buf[:nb]
        x64.copy_(x.detach())
        norms = torch.linalg.vector_norm(x64, dim=1)
        # 1/‖x‖, and 0 for zero vectors (no direction); a non-finite row is caught
        # below through the mean.
        inv_norm = torch.reciprocal(norms).nan_to_num_(nan=0.0, posinf=0.0)
        xt = x64.T
        unit_sum = torch.mv(xt, inv_norm)
        bmean = torch.mv(xt, torch.full_like(inv_norm, 1.0 / nb))
        if not bool(torch.isfinite(bmean).all()):
            raise NonFiniteInput("batch holds NaN or infinite values; drop or repair those rows")
        if float(norms.max()) > MAX_NORM:  # (inf too: a norm that itself overflowed)
            raise EmbgeomError(
                f"batch holds values up to {float(x64.abs().max()):.3g} in magnitude: their squares overflow "
                f"float64 (vector norms up to {MAX_NORM:.0e} are accepted); rescale the data (divided by c: "
                "Q, M, V scale by 1/c², the spectrum ratios do not change)")
        x64 -= bmean
        n = self.n + nb
        delta = bmean - self._mean
        if self.n:
            # Σ(x − μ)(x − μ)ᵀ of the union = scatter + batch scatter + (n₁n₂/n) δδᵀ.
            torch.mul(delta, math.sqrt(self.n * nb / n), out=buf[nb])
            add_gram_upper(self._scatter, buf)
        else:
            add_gram_upper(self._scatter, x64)
        self._mean.add_(delta, alpha=nb / n)
        self._unit_sum.add_(unit_sum)
        self.n = n
        self.n_nonzero += int(torch.count_nonzero(norms))
        return self

    def _update_float32(self, x: torch.Tensor) -> bool:
        """Add a batch in model precision with float32 products (module docstring).
        Returns False, with nothing changed, when float32 overflowed on finite data
        (huge bfloat16 values): the caller then takes the float64 path."""

        if x.device != self._device:
            x = x.to(self._device)
        nb = x.shape[0]
        gram = _gram_work(self.dim, self._device)
        with ieee_fp32_matmul():
            # The reference row: the batch's own mean, roughly (float32 sums) and held
            # in float32, so that the float64 algebra below adds back exactly the row
            # the centring took off. It depends on the batch alone, so a batch gives
            # the same products in any accumulator: sharding, merge order and
            # resuming leave the numbers as they are, and nothing is kept in the state.
            ref32 = x.sum(0, dtype=torch.float32).div_(nb)
            # One pass converts and centres (a float32 result whatever the model dtype).
            y = torch.sub(x, ref32)
            norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
            # 1/‖x‖, and 0 for zero vectors (no direction). Σ x/‖x‖ = Σ y/‖x‖ + ref Σ 1/‖x‖.
            inv_norm = torch.reciprocal(norms).nan_to_num_(nan=0.0, posinf=0.0)
            yt = y.T
            ysum = torch.mv(yt, torch.ones_like(inv_norm))
            usum = torch.mv(yt, inv_norm)
            add_gram_upper(gram, y, beta=0.0)
        finite = torch.isfinite(ysum).all() & torch.isfinite(norms).all() & torch.isfinite(gram.diagonal()).all()
        if not bool(finite):
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteInput("batch holds NaN or infinite values")
            return False
        # float64 from here: batch scatter Σ(x − m)(x − m)ᵀ = Σ yyᵀ − nb ȳȳᵀ with
        # m = ref + ȳ, then the Chan update as in `update`.
        ref = ref32.to(torch.float64)
        ybar = ysum.to(torch.float64).div_(nb)
        n = self.n + nb
        delta = (ref + ybar).sub_(self._mean)
        self._scatter.add_(gram)  # below the diagonal blocks the work matrix holds zeros
        self._scatter.addr_(ybar, ybar, alpha=-float(nb))
        if self.n:
            self._scatter.addr_(delta, delta, alpha=self.n * nb / n)
        self._mean.add_(delta, alpha=nb / n)
        self._unit_sum.add_(usum.to(torch.float64)).add_(ref.mul_(inv_norm.sum(dtype=torch.float64)))
        self.n = n
        self.n_nonzero += int(torch.count_nonzero(norms))
        return True

    def _scatter_full(self) -> torch.Tensor:
        """Σ (x − μ)(x − μ)ᵀ, symmetric (the state keeps its upper triangle)."""
        return symmetric_from_upper(self._scatter)

    def merge(self, other: "Moments") -> "Moments":
        """Merge another accumulator into this one, exactly (Chan et al.); returns self."""
        if not isinstance(other, Moments):
            raise EmbgeomError(f"can only merge a Moments, got {type(other).__name__}")
        if other.dim != self.dim:
            raise EmbgeomError(f"cannot merge Moments of width {other.dim} into width {self.dim}")
        if other.n == 0:
            return self
        if self._mean is None:
            self._init_state(self._device if self._device is not None else other._device)
        dev = self._device
        # Chan et al.: scatter of the union = both scatters + (n₁n₂/n) δδᵀ. Only the
        # upper triangle of the state is kept up to date (see `_scatter_full`).
        nb = other.n
        n = self.n + nb
        delta = other._mean.to(dev) - self._mean
        self._mean.add_(delta, alpha=nb / n)
        self._scatter.add_(other._scatter_full().to(dev))
        if self.n:
            self._scatter.addr_(delta, delta, alpha=self.n * nb / n)
        self._unit_sum.add_(other._unit_sum.to(dev))
        self.n = n
        self.n_nonzero += other.n_nonzero
        self.products |= other.products
        return self

    # ------------------------------------------------------------------ results
    def _require_data(self, what: str) -> None:
        if self.n == 0:
            raise EmbgeomError(f"Moments.{what} needs at least one vector; none was added")

    @property
    def mean(self) -> np.ndarray:
        self._require_data("mean")
        return _to_numpy(self._mean)

    @property
    def M(self) -> float:
        self._require_data("M")
        return float(self._mean @ self._mean)

    @property
    def V(self) -> float:
        self._require_data("V")
        return float(torch.trace(self._scatter)) / self.n

    @property
    def Q(self) -> float:
        return self.M + self.V

    @property
    def covariance(self) -> np.ndarray:
        self._require_data("covariance")
        return _to_numpy(self._scatter_full()) / self.n

    @property
    def second_moment(self) -> np.ndarray:
        mu = self.mean
        return self.covariance + np.outer(mu, mu)

    @property
    def mean_cosine(self) -> float:
        """Mean of cos(x_i, x_j) over ordered pairs i ≠ j of non-zero vectors, exact:
        (‖Σ u_i‖² − N) / (N(N − 1)) with u = x/‖x‖ (zero vectors have no direction and
        are left out of N here)."""
        n = self.n_nonzero
        if n < 2:
            return math.nan
        s = float(self._unit_sum @ self._unit_sum)
        return (s - n) / (n * (n - 1.0))

    def eigenvalues(self) -> np.ndarray:
        """Covariance eigenvalues, descending (float64)."""
        self._require_data("eigenvalues")
        return eigenvalues(self.covariance)

    def metrics(self, eigenvalues_out: list | None = None) -> dict[str, float]:
        """Q M V anisotropy anisotropy_uncentered mean_cosine isoscore effective_rank
        participation_ratio (formulas in the README). If `eigenvalues_out` is a list, the covariance
        spectrum is appended to it, so callers need not decompose twice."""
        self._require_data("metrics")
        lam = self.eigenvalues()
        if eigenvalues_out is not None:
            eigenvalues_out.append(lam)
        spec = spectrum_metrics(lam)
        # Only the top eigenvalue of the second moment is needed; its trace is Q.
        top_unc = top_eigenvalue(self.second_moment)
        total_unc = self.Q
        return {
            "Q": self.Q,
            "M": self.M,
            "V": self.V,
            "anisotropy": spec["anisotropy"],
            "anisotropy_uncentered": float(top_unc / total_unc) if total_unc > 0 else math.nan,
            "mean_cosine": self.mean_cosine,
            "isoscore": spec["isoscore"],
            "effective_rank": spec["effective_rank"],
            "participation_ratio": spec["participation_ratio"],
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain tensors and ints (CPU), enough to rebuild this accumulator exactly."""
        sd = {"kind": "Moments", "version": 1, "dim": self.dim, "n": self.n, "n_nonzero": self.n_nonzero,
              "precision": self.precision, "products": sorted(self.products)}
        if self._mean is not None:
            sd.update(
                mean=self._mean.detach().cpu().clone(),
                scatter=self._scatter_full().detach().cpu(),
                unit_sum=self._unit_sum.detach().cpu().clone(),
            )
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, device=None) -> "Moments":
        """Rebuild an accumulator from ``state_dict()`` exactly, on `device` (default
        CPU); a state no accumulator could have written is refused (EmbgeomError)."""
        _state.check_kind(sd, "Moments")
        k = "Moments"
        d = _state.count(_state.entry(sd, k, "dim"), k, "dim", low=1)
        n = _state.count(_state.entry(sd, k, "n"), k, "n")
        m = cls(d, device=device, precision=sd.get("precision", "auto"))
        m.n = n
        m.n_nonzero = _state.count(_state.entry(sd, k, "n_nonzero"), k, "n_nonzero", high=n)
        products = sd.get("products", ())
        if not isinstance(products, (list, tuple)) or not all(isinstance(p, str) for p in products):
            raise EmbgeomError(f"Moments state_dict: products must be a list of names, got {products!r}")
        m.products = set(products)
        if "mean" in sd or n:
            mean = _state.tensor(_state.entry(sd, k, "mean"), k, "mean", (d,))
            scatter = _state.scatter_matrix(_state.tensor(_state.entry(sd, k, "scatter"), k, "scatter", (d, d)),
                                            k, "scatter")
            unit_sum = _state.tensor(_state.entry(sd, k, "unit_sum"), k, "unit_sum", (d,))
            _state.norm_at_most(unit_sum, m.n_nonzero, k, "unit_sum")
            m._init_state(device if device is not None else "cpu")
            m._mean.copy_(mean)
            m._scatter.copy_(scatter)
            m._unit_sum.copy_(unit_sum)
        return m

    def to(self, device) -> "Moments":
        """Move the state to `device` in place; returns self."""
        self._device = torch.device(device)
        if self._mean is not None:
            self._mean, self._scatter, self._unit_sum = (t.to(self._device)
                                                         for t in (self._mean, self._scatter, self._unit_sum))
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the state: allocated by the first batch (an accumulator that never
        sees a vector, e.g. a layer's outliers where it has none, holds nothing)."""
        return 0 if self._scatter is None else self.nbytes_for(self.dim)

    @staticmethod
    def nbytes_for(dim: int) -> int:
        """Bytes of the float64 state at width `dim`: the d × d scatter, the mean and the
        unit-vector sum."""
        return 8 * (dim * dim + 2 * dim)

    def __repr__(self) -> str:
        return f"Moments(dim={self.dim}, n={self.n})"

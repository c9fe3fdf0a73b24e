"""Which candidate precision the exact k-NN uses: chosen by measurement, among
exact paths only.

Both candidate paths give the same, exact, answer (:mod:`.neighbors`); they differ
in speed only, and which is faster depends on the CPU: bfloat16 products run 2–5×
faster than float32 where the CPU multiplies bf16 in hardware (AVX512-BF16, AMX),
and hundreds of times slower where oneDNN emulates them. So ``precision="auto"``
follows :func:`embgeom._hardware.pick_fastest`: once per process and width, it
times one candidate tile (``_TILE`` points against ``_TILE``) of each path this CPU
runs natively, and takes the fastest; bf16 is a candidate only where the CPU has
bf16 instructions and its products keep the key bound (:func:`bf16_keeps_bound`).
The choice and the timings go back to the caller with the k-NN's diagnostics.

Every function here runs with ``embgeom._numba.LOCK`` held (the k-NN holds it).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _hardware
from . import _knn_bounds as kb
from . import _knn_points as kp
from .._hardware import ieee_fp32_matmul

_TILE = 512
_CHOICES: dict = {}  # width -> the "auto" choice (once per process)
_BF16_OK: dict = {}  # width -> whether bf16 products keep the bound


def _random_operands(precision: str, d: int, pts: np.ndarray | None = None):
    """Operands of ``pts`` (default: ``_TILE`` standard normal points), centred on
    zero, unscaled: (tile_fn, dtype, bounds, n)."""
    if pts is None:
        pts = np.random.default_rng(7).standard_normal((_TILE, d))
    n = pts.shape[0]
    n_pad = -(-n // kb._GROUP) * kb._GROUP
    nhat, _, state = kb.prepare(pts, np.arange(n, dtype=np.int64), np.zeros(d), 1.0, precision, n_pad)
    return (*kb.operands(state, nhat, n_pad, d), n)


def bf16_keeps_bound(d: int) -> bool:
    """Whether bf16 products here keep the key bound of the bf16 path: checked once
    per width on near-duplicate pairs far from the origin, where any accumulation
    in reduced precision would break it."""
    if d not in _BF16_OK:
        ok = False
        try:
            g = np.random.default_rng(2024)
            m = 96
            base = g.standard_normal((m, d)) * 50
            pts = np.concatenate([base, base + 1e-2 * g.standard_normal((m, d)), g.standard_normal((m, d)) * 1e-2])
            tile_fn, dt, b, n = _random_operands("bf16", d, pts)
            r = tile_fn(0, n, 0, n, torch.empty((n, n), dtype=dt)).double()
            a, c = np.divmod(np.arange(n * n, dtype=np.int64), n)
            D = np.empty(n * n)
            kp.pair_sq(pts, a, c, D)
            D = torch.from_numpy(0.5 * D).view(n, n)
            idx = torch.arange(n)
            ok = bool((b.lower(r) <= D).all()) and bool((D <= b.upper(r, idx, idx)).all())
        except Exception:  # pragma: no cover - no bf16 matmul on this device
            ok = False
        _BF16_OK[d] = ok
    return _BF16_OK[d]


def tile_seconds(precision: str, d: int) -> float:
    """Best time of one ``_TILE × _TILE`` candidate tile's product in ``precision``."""
    tile_fn, dt, _, n = _random_operands(precision, d)
    out = torch.empty((n, n), dtype=dt)
    with ieee_fp32_matmul():
        return _hardware.best_time(lambda: tile_fn(0, n, 0, n, out), repeat=5)


def choose(d: int, precision: str) -> dict:
    """The candidate precision for width ``d``: ``precision`` is "auto", "bf16" or
    "fp32". Returns {precision, chosen_by ("measured" or "given"), tile_seconds
    {bf16, fp32} (None where not timed), bf16_native}. A requested "bf16" becomes
    "fp32" where bf16 products do not keep the bound."""
    native = _hardware.bf16_native()
    if precision != "auto":
        got = "bf16" if precision == "bf16" and bf16_keeps_bound(d) else "fp32"
        return {"precision": got, "chosen_by": "given", "tile_seconds": {"bf16": None, "fp32": None},
                "bf16_native": native}
    if d not in _CHOICES:
        timings = {"fp32": tile_seconds("fp32", d), "bf16": None}
        usable = native and bf16_keeps_bound(d)
        if usable:  # an emulated path is never timed (minutes on some CPUs) nor taken
            timings["bf16"] = tile_seconds("bf16", d)
        _CHOICES[d] = {"precision": _hardware.pick_fastest(timings, () if usable else ("bf16",)),
                       "chosen_by": "measured", "tile_seconds": timings, "bf16_native": native}
    return dict(_CHOICES[d], tile_seconds=dict(_CHOICES[d]["tile_seconds"]))

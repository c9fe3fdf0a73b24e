"""What a process imports, and when: `import embgeom` and `embgeom --help` import
neither torch nor numba; the compiled loops load only once their work repays the
second they cost ("auto" mode of embgeom.stats._kernels), and results do not depend
on when that happens. Each check runs in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_import_and_help_stay_light():
    out = run_python("""
        import sys
        import embgeom
        light = "torch" not in sys.modules and "numba" not in sys.modules
        from embgeom.cli import main  # what `embgeom` runs (before its fast exit)
        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        print(light, "torch" in sys.modules, "numba" in sys.modules, "transformers" in sys.modules)
    """)
    assert out.splitlines()[-1] == "True False False False"


def test_public_names_load_on_first_use():
    out = run_python("""
        import sys
        import embgeom
        from embgeom import Moments, TokenMoments, analyze, twonn, Result, EmbgeomError
        assert embgeom.Moments is Moments and "Moments" in dir(embgeom)
        assert set(embgeom.__all__) <= set(dir(embgeom))
        try:
            embgeom.no_such_name
        except AttributeError as exc:
            print("AttributeError", "no_such_name" in str(exc))
        print("numba" in sys.modules)
    """)
    assert out.splitlines() == ["AttributeError True", "False"]


def test_training_names_exported_from_the_package():
    """The README's Python section imports the training helpers from the package."""
    out = run_python("""
        import embgeom
        from embgeom import GeometryCallback, GeometryProbe
        from embgeom.callback import GeometryCallback as C, GeometryProbe as P
        print(GeometryCallback is C, GeometryProbe is P, {"GeometryCallback", "GeometryProbe"} <= set(embgeom.__all__))
    """)
    assert out.splitlines()[-1] == "True True True"


def test_token_moments_switch_to_compiled_loops_after_enough_rows():
    """In "auto" mode the torch path serves the first AUTO_WORK floats, then the
    compiled loops load and serve the rest; the state equals a run on the torch
    path alone to rounding."""
    out = run_python("""
        import sys
        import numpy as np
        import torch
        from embgeom.stats import _kernels
        from embgeom.stats.token_moments import TokenMoments

        assert _kernels.ENABLED == "auto"
        _kernels.AUTO_WORK = 1000 * 16  # 1,000 rows of width 16
        rng = np.random.default_rng(3)
        batches = [(torch.from_numpy(rng.standard_normal((400, 16)).astype(np.float32) + 50),
                    torch.from_numpy(rng.integers(0, 30, 400))) for _ in range(6)]
        auto = TokenMoments(16)
        seen = []
        for x, ids in batches:
            auto.update(x, ids)
            seen.append(("numba" in sys.modules, _kernels.use_kernels(torch.device("cpu"))))
        print(seen)
        _kernels.ENABLED = False
        ref = TokenMoments(16)
        for x, ids in batches:
            ref.update(x, ids)
        a, r = auto.state_dict(), ref.state_dict()  # rows sorted by token id
        assert a["token_ids"].equal(r["token_ids"])
        for key in ("counts", "mean", "m2"):
            va, vr = a[key].numpy(), r[key].numpy()
            err = float(np.max(np.abs(va - vr) / np.maximum(np.abs(vr), 1e-300)))
            print(key, err < 1e-12)
    """)
    lines = out.splitlines()
    seen = eval(lines[0])
    # 400 and 800 rows: torch path, numba not imported; at 1200 the loops load.
    assert seen[:2] == [(False, False), (False, False)]
    assert all(s == (True, True) for s in seen[2:])
    assert lines[1:] == ["counts True", "mean True", "m2 True"]


def test_knn_loads_compiled_loops_only_for_large_inputs():
    out = run_python("""
        import sys
        import numpy as np
        import torch
        from embgeom.metrics import neighbors
        from embgeom.stats import _kernels

        neighbors.COMPILED_MIN_POINTS = 300
        rng = np.random.default_rng(0)
        for n in (200, 400):
            X = rng.standard_normal((n, 5))
            d, i = neighbors.knn(X, 3)
            ref = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
            np.fill_diagonal(ref, np.inf)
            ok = np.allclose(d.numpy(), np.sort(ref, axis=1)[:, :3], rtol=1e-12, atol=0)
            print(n, ok, "numba" in sys.modules)
    """)
    assert out.splitlines() == ["200 True False", "400 True True"]


@pytest.mark.parametrize("mode", [True, False])
def test_explicit_modes_ignore_the_rule(mode):
    """ENABLED=True uses the loops from the first row, False never loads them."""
    out = run_python(f"""
        import sys
        import torch
        from embgeom.stats import _kernels
        from embgeom.stats.token_moments import TokenMoments

        _kernels.ENABLED = {mode}
        _kernels.AUTO_WORK = 10
        TokenMoments(4).update(torch.ones(50, 4), torch.arange(50) % 3)
        print("numba" in sys.modules)
    """)
    assert out == str(mode)


def test_a_sweep_of_small_knn_searches_switches_too():
    """Small kNNs (below COMPILED_MIN_POINTS) run on torch, but count toward the same
    budget: once their extra time reaches it, the compiled loops load."""
    out = run_python('''
        import sys
        import numpy as np
        from embgeom.metrics import neighbors
        from embgeom.stats import _kernels

        n, d = 300, 8
        per_call = n * n * d // neighbors._KNN_WORK_DIVISOR
        _kernels.AUTO_WORK = 3 * per_call
        X = np.random.default_rng(1).standard_normal((n, d))
        seen = []
        for _ in range(4):
            neighbors.knn(X, 2)
            seen.append("numba" in sys.modules)
        print(seen)
    ''')
    assert out == "[False, False, True, True]"

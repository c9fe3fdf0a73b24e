"""What a process imports, and when: `import embgeom` and `embgeom --help` import
neither torch nor numba; importing the accumulators or the k-NN does not import
numba either; the first CPU work does (one rule: compiled loops on the CPU), and the
state equals that of the torch path to rounding. Each check runs in a fresh
interpreter."""
from __future__ import annotations

import subprocess
import sys
import textwrap



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


def test_cpu_work_takes_the_compiled_loops_from_the_first_call():
    """numba loads with the first TokenMoments.update or k-NN on the CPU (not at
    import); the compiled state equals the torch path's to rounding."""
    out = run_python("""
        import sys
        import numpy as np
        import torch
        from embgeom import _numba
        from embgeom.metrics.neighbors import knn
        from embgeom.stats.token_moments import TokenMoments

        print("numba" in sys.modules)
        rng = np.random.default_rng(3)
        batches = [(torch.from_numpy(rng.standard_normal((400, 16)).astype(np.float32) + 50),
                    torch.from_numpy(rng.integers(0, 30, 400))) for _ in range(3)]
        fast = TokenMoments(16)
        for x, ids in batches:
            fast.update(x, ids)
        print("numba" in sys.modules)
        _numba.serves = lambda device: False  # the torch path, as on an accelerator
        ref = TokenMoments(16)
        for x, ids in batches:
            ref.update(x, ids)
        a, r = fast.state_dict(), ref.state_dict()  # rows sorted by token id
        assert a["token_ids"].equal(r["token_ids"])
        for key in ("counts", "mean", "m2"):
            va, vr = a[key].numpy(), r[key].numpy()
            err = float(np.max(np.abs(va - vr) / np.maximum(np.abs(vr), 1e-300)))
            print(key, err < 1e-12)
    """)
    assert out.splitlines() == ["False", "True", "counts True", "mean True", "m2 True"]


def test_knn_loads_the_compiled_loops_on_first_use():
    out = run_python("""
        import sys
        import numpy as np
        from embgeom.metrics import neighbors

        print("numba" in sys.modules)
        X = np.random.default_rng(0).standard_normal((200, 5))
        d, i = neighbors.knn(X, 3)
        ref = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(ref, np.inf)
        print(np.allclose(d.numpy(), np.sort(ref, axis=1)[:, :3], rtol=1e-12, atol=0), "numba" in sys.modules)
    """)
    assert out.splitlines() == ["False", "True True"]


def test_saving_without_figures_does_not_load_matplotlib():
    """`--no-figures` (save_run(figures=False)) writes tables and report.md without
    importing the figure modules; figures=True draws with them."""
    out = run_python("""
        import sys, tempfile
        from pathlib import Path
        from embgeom import analyze, save_run
        from embgeom.packaged import minilm_path
        res = analyze(minilm_path(), ["A short text for a run."], id_sample=0, token_types="none",
                      cross_layer=False, progress=False)
        out = save_run(res, tempfile.mkdtemp(), figures=False)
        print("matplotlib" in sys.modules, (out / "report.md").exists())
        out = save_run(res, tempfile.mkdtemp(), figures=True)
        print("matplotlib" in sys.modules, any(Path(out, "figures").glob("*.png")))
    """)
    assert out.splitlines()[-2:] == ["False True", "True True"]

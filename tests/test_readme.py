"""The README's Python example runs as written (paths and sizes swapped for a tiny
model and corpus), so the documented API cannot drift from the code."""
import re
from pathlib import Path

import numpy as np

import embgeom

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tiny_models, lee_corpus, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    code = python_example()
    for old, new in (('"path/to/model"', repr(str(tiny_models["llama"]))), ('"corpus.txt"', repr(str(lee_corpus))),
                     ('"out/snapshots"', repr(str(tmp_path / "out" / "snapshots"))), ('"out/"', repr(str(tmp_path / "out"))),
                     ("seq_len=512", "seq_len=64"), ("max_tokens=50_000", "max_tokens=2_000"),
                     ('resume="auto",', 'resume="auto", seq_len=64, max_tokens=2_000,')):  # a 128-position model
        assert old in code, f"the README example no longer has {old}; update this test with it"
        code = code.replace(old, new)
    rng = np.random.default_rng(0)
    other = embgeom.Moments(384)
    other.update(rng.normal(size=(50, 384)))
    scope = {"batch": rng.normal(size=(200, 384)), "other_moments": other,
             "token_ids": rng.integers(0, 40, size=200), "X": rng.normal(size=(500, 8))}
    exec(compile(code, str(README), "exec"), scope)
    again, result = scope["again"], scope["result"]
    assert (tmp_path / "out" / "layers.csv").exists() and (tmp_path / "out" / "report.md").exists()
    assert len(again.layers) == len(result.layers) and result.run["config"]["dtype"] == "bfloat16"
    assert scope["m"].n == 250 and scope["t"].n == 200

"""No run is lost after the stream: a metric that is undefined or fails is NaN with a
warning (run.json, report.md, stderr), a figure that fails is a warning, and every
table is written."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from embgeom.cli import main
from embgeom.metrics.spectrum import top_eigenvalue

TABLES = ["layers.csv", "layers.parquet", "spectrum.parquet", "tokens.parquet", "outliers.csv", "run.json",
          "report.md"]


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


def _zeroed_final_norm(src, dst):
    """The tiny GPT-2 with its final LayerNorm's weight and bias 0: the last hidden
    state is all zeros."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_top_eigenvalue_of_the_zero_matrix():
    assert top_eigenvalue(np.zeros((6, 6))) == 0.0  # ARPACK raised "starting vector is zero"
    a = np.diag([3.0, 1.0, 0.5, 0.0])
    assert top_eigenvalue(a) == pytest.approx(3.0, rel=1e-12)


def test_zeroed_final_norm_runs_to_the_end(tiny_models, lee_corpus, tmp_path, capsys):
    model = _zeroed_final_norm(tiny_models["gpt2"], tmp_path / "zeroed")
    out = tmp_path / "out"
    code, err = run_cli(["run", str(model), "--corpus", str(lee_corpus), "--out", str(out), "--max-tokens", "300",
                         "--seq-len", "64", "--id-sample", "200", "--no-progress"], capsys)
    assert code == 0, err
    assert all((out / f).exists() for f in TABLES)
    layers = pd.read_csv(out / "layers.csv")
    last = layers[layers["layer"] == 3]
    assert (last["n_tokens"] == 300).all() and (last["V"] == 0).all() and (last["Q"] == 0).all()
    for col in ("anisotropy", "anisotropy_uncentered", "isoscore", "effective_rank", "id_twonn"):
        assert last[col].isna().all(), col
    assert (last["id_n"] == 0).all()  # one distinct vector (zero): none used
    inner = layers[layers["layer"] < 3]
    assert inner["anisotropy"].notna().all() and inner["id_twonn"].notna().all()
    warnings = json.loads((out / "run.json").read_text())["warnings"]
    assert any("variance V = 0" in w and "decoder 3" in w for w in warnings), warnings
    assert any("fewer than 3 distinct sampled vectors at layers decoder 3:" in w for w in warnings), warnings
    report = (out / "report.md").read_text()
    assert "## Warnings" in report and all(w in report for w in warnings)
    assert "embgeom: warning: every counted vector is the same (variance V = 0)" in err


def test_one_token_writes_every_table(tiny_models, lee_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus), "--out", str(out),
                         "--max-tokens", "1", "--seq-len", "32", "--no-progress"], capsys)
    assert code == 0, err
    assert all((out / f).exists() for f in TABLES)
    layers = pd.read_csv(out / "layers.csv")
    assert (layers["n_tokens"] == 1).all() and (layers["V"] == 0).all()
    assert layers["anisotropy"].isna().all() and layers["mean_cosine"].isna().all()
    assert (layers["Q"] > 0).all() and layers["id_twonn"].isna().all()
    warnings = json.loads((out / "run.json").read_text())["warnings"]
    assert any(w.startswith("only 1 token counted at layers decoder 0, 1, 2, 3:") for w in warnings), warnings
    assert not any(w.startswith("figure") for w in warnings), warnings  # nothing to draw is no failure
    assert (out / "figures" / "layer_profiles.png").exists()


def test_a_failing_figure_is_a_warning(tiny_models, lee_corpus, tmp_path, capsys, monkeypatch):
    import embgeom.plots as plots

    def broken(*args, **kwargs):
        raise RuntimeError("no room on this canvas")

    monkeypatch.setattr(plots, "plot_anisotropy_id", broken)
    out = tmp_path / "out"
    code, err = run_cli(["run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus), "--out", str(out),
                         "--max-tokens", "200", "--seq-len", "32", "--id-sample", "100", "--no-progress"], capsys)
    assert code == 0, err
    assert all((out / f).exists() for f in TABLES)
    want = ("figure anisotropy_id.png was not drawn (RuntimeError: no room on this canvas); "
            "the tables are complete")
    assert json.loads((out / "run.json").read_text())["warnings"] == [want]
    assert f"embgeom: warning: {want}" in err and want in (out / "report.md").read_text()
    assert not (out / "figures" / "anisotropy_id.png").exists()
    assert (out / "figures" / "layer_profiles.png").exists()


def test_a_failing_metric_is_nan_with_a_warning(tiny_models, lee_corpus, monkeypatch):
    """A numerical library's error in one metric costs its columns, not the run."""
    import embgeom.stats.moments as moments
    from embgeom import analyze

    def broken(matrix):
        raise ArithmeticError("eigensolver gave up")

    monkeypatch.setattr(moments, "top_eigenvalue", broken)
    texts = lee_corpus.read_text().splitlines()[:3]
    res = analyze(str(tiny_models["gpt2"]), texts, max_tokens=200, seq_len=32, id_sample=0, device="cpu")
    assert res.layers["anisotropy"].isna().all() and res.layers["V"].notna().all()
    assert math.isfinite(res.layers["Q"].iloc[0])
    assert res.run["warnings"][0] == ("decoder layer 0 (inliers): spectrum metrics failed "
                                      "(ArithmeticError: eigensolver gave up); its columns are NaN")

"""One line instead of a traceback: configs without blocks, damaged or foreign run
directories for `embgeom plot`, non-finite or overflowing values, NaN hidden states
(named by their real stack, with the fix that fits the dtype), --revision on a local
model."""
import json
import re
import shutil

import numpy as np
import pytest

from embgeom import EmbgeomError, Moments, analyze, anisotropy
from embgeom.cli import main


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


def one_line(code, err, needle):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("embgeom: error:") and needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("n_layer", [0, -2])
def test_config_without_blocks(tiny_models, lee_corpus, tmp_path, capsys, n_layer):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["gpt2"], model)
    config = json.loads((model / "config.json").read_text())
    config["n_layer"] = n_layer
    (model / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["run", str(model), "--corpus", str(lee_corpus), "--out", str(tmp_path / "out"),
                         "--no-progress"], capsys)
    one_line(code, err, f"its config gives num_hidden_layers = {n_layer} (transformer blocks); a model needs "
                        "at least one: fix config.json")


def test_plot_on_damaged_or_foreign_directories(tiny_models, lee_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    texts = lee_corpus.read_text().splitlines()[:2]
    analyze(str(tiny_models["gpt2"]), texts, max_tokens=60, seq_len=32, id_sample=0, device="cpu").save(run)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "layers.csv").write_text("epoch,loss\n1,0.5\n")
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "layers.parquet").write_bytes((run / "layers.parquet").read_bytes()[:200])
    bad_json = tmp_path / "bad-json"
    shutil.copytree(run, bad_json)
    (bad_json / "run.json").write_text("{not json")
    cases = {foreign: "foreign/layers.csv is not an embgeom table (no column model, stack, layer",
             damaged: "damaged/layers.parquet cannot be read as embgeom's layers.parquet (ArrowInvalid",
             bad_json: "bad-json/run.json cannot be read as embgeom's run.json (JSONDecodeError"}
    for directory, needle in cases.items():
        code, err = run_cli(["plot", str(directory), "--out", str(tmp_path / "figs")], capsys)
        one_line(code, err, needle)
    code, err = run_cli(["plot", str(run), "--out", str(tmp_path / "figs")], capsys)
    assert code == 0, err  # the intact run still plots


def test_anisotropy_and_moments_on_nan_and_huge_values():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5)) * [4, 2, 1, 1, 1]
    lam = np.linalg.eigvalsh(np.cov(X.T, bias=True))
    want = lam.max() / lam.sum()  # reference from the formula
    assert anisotropy(X) == pytest.approx(want, rel=1e-12)
    # 1e200: the squares overflow float64; the ratio is scale-free and computed scaled
    assert anisotropy(X * 1e200) == pytest.approx(want, rel=1e-12)
    assert anisotropy(X * 1e-200) == pytest.approx(want, rel=1e-12)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(EmbgeomError, match="X contains NaN or infinite values; anisotropy is undefined"):
        anisotropy(bad)
    with pytest.raises(EmbgeomError, match="batch holds NaN or infinite values; drop or repair those rows"):
        Moments(5).update(bad)
    m = Moments(5)
    top = f"{np.abs(X * 1e200).max():.3g}"
    with pytest.raises(EmbgeomError, match=re.escape(f"values up to {top} in magnitude: their squares overflow")):
        m.update(X * 1e200)
    assert m.n == 0  # refused before any change
    m.update(X * 1e100)  # large but safe: exact up to scale
    assert m.metrics()["anisotropy"] == pytest.approx(want, rel=1e-9)


def _nan_gpt2(src, dst):
    import torch
    import transformers as tf

    m = tf.GPT2LMHeadModel.from_pretrained(src)
    with torch.no_grad():
        m.transformer.h[1].mlp.c_proj.bias.fill_(float("nan"))
    m.save_pretrained(dst)
    tf.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_nan_hidden_states_name_the_decoder_and_the_right_fix(tiny_models, lee_corpus, tmp_path, capsys):
    model = _nan_gpt2(tiny_models["gpt2"], tmp_path / "nan-model")
    argv = ["run", str(model), "--corpus", str(lee_corpus), "--max-tokens", "100", "--seq-len", "32",
            "--no-progress", "--no-figures"]
    code, err = run_cli([*argv, "--out", str(tmp_path / "a")], capsys)
    line = one_line(code, err, "hidden states of decoder layer 2 are not finite (NaN or inf); the model runs in "
                               "float32, so this is not an overflow of half precision")
    assert "--dtype" not in line
    code, err = run_cli([*argv, "--out", str(tmp_path / "b"), "--dtype", "bfloat16"], capsys)
    one_line(code, err, "hidden states of decoder layer 2 are not finite (NaN or inf); the model overflows in "
                        "bfloat16: try --dtype float32")


def test_revision_on_a_local_model_is_refused(tiny_models, lee_corpus, tmp_path, capsys):
    code, err = run_cli(["run", str(tiny_models["gpt2"]), "--revision", "main", "--corpus", str(lee_corpus),
                         "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    one_line(code, err, f"--revision main names a Hub revision, but {tiny_models['gpt2']} is a local directory")
    assert not (tmp_path / "out" / "layers.csv").exists()
    with pytest.raises(EmbgeomError, match="^revision=v2 names a Hub revision"):
        analyze(str(tiny_models["gpt2"]), ["some text"], revision="v2")

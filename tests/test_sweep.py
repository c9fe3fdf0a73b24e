"""Checkpoint sweeps: targets from names and Trainer directories, order by step,
one output directory, resumable; training-dynamics figures."""
import json

import numpy as np
import pandas as pd
import pytest

import embgeom.pipeline
from embgeom import EmbgeomError, analyze
from embgeom.sweep import expand_targets, parse_step, run_sweep

OPTIONS = dict(max_tokens=300, seq_len=64, device="cpu", id_sample=0)


@pytest.mark.parametrize("name, step", [
    ("step1000", 1000), ("global_step200", 200), ("main", None), ("step0", 0),
    ("step143000", 143000), ("step1000-tokens4B", 1000), ("checkpoint-500", 500), ("iter_0001000", 1000),
    ("1500", 1500), ("v1.0", None), ("gpt2", None), ("a1b2c3d", None), ("laststep5x", None), (None, None),
])
def test_parse_step(name, step):
    assert parse_step(name) == step


def test_hub_revisions_are_ordered_by_step_unknown_last():
    targets = expand_targets(["EleutherAI/pythia-70m"], ["step2000", "main", "step1000", "step0"])
    assert [t.revision for t in targets] == ["step0", "step1000", "step2000", "main"]
    assert [t.step for t in targets] == [0, 1000, 2000, None]
    assert [t.display for t in targets][-1] == "EleutherAI/pythia-70m@main"
    # Several models without revisions keep the order given.
    assert [t.spec for t in expand_targets(["b/x", "a/y"])] == ["b/x", "a/y"]
    # Explicit steps, one per target in the order named.
    assert [(t.revision, t.step) for t in expand_targets(["m/x"], ["r1", "r2"], [20, 10])] == [("r2", 10), ("r1", 20)]
    with pytest.raises(EmbgeomError, match="--step was given 1 time"):
        expand_targets(["m/x"], ["r1", "r2"], [5])
    with pytest.raises(EmbgeomError, match="named twice"):
        expand_targets(["m/x"], ["r1", "r1"])


@pytest.fixture(scope="module")
def trainer_dir(tiny_models, tmp_path_factory):
    """A Trainer output directory: checkpoint-30, -10, -20 created in that order,
    each with different weights (and no config.json at the top)."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("sweep") / "my-run"
    tok = tf.AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    for step in (30, 10, 20):
        model = tf.GPT2LMHeadModel.from_pretrained(tiny_models["gpt2"])
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        d = root / f"checkpoint-{step}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
    (root / "runs").mkdir()  # other things a Trainer leaves are ignored
    return root


def test_checkpoint_directory_expands_in_step_order(trainer_dir):
    targets = expand_targets([str(trainer_dir)])
    assert [t.step for t in targets] == [10, 20, 30]
    assert [t.label for t in targets] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert {t.name for t in targets} == {"my-run"}
    assert [t.step for t in expand_targets([str(trainer_dir)], ["checkpoint-30", "checkpoint-10"])] == [10, 30]
    with pytest.raises(EmbgeomError, match="no checkpoint folder 'checkpoint-99'"):
        expand_targets([str(trainer_dir)], ["checkpoint-99"])
    # The checkpoint folders named one by one (run/checkpoint-*) give the same targets.
    listed = expand_targets([str(trainer_dir / n) for n in ("checkpoint-30", "checkpoint-20", "checkpoint-10")])
    assert [(t.name, t.label, t.step) for t in listed] == [(t.name, t.label, t.step) for t in targets]
    with pytest.raises(EmbgeomError, match="no config.json and no checkpoint-N"):
        expand_targets([str(trainer_dir / "runs")])


def test_sweep_writes_steps_in_order_and_resumes_without_reanalysing(trainer_dir, lee_corpus, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    targets = expand_targets([str(trainer_dir)])
    messages = []
    res = run_sweep(targets, str(lee_corpus), out, progress=False, figures=False, say=messages.append, **OPTIONS)
    layers = pd.read_csv(out / "layers.csv")
    n = len(layers) // 3
    assert n == 2 * 4  # 3 blocks + embeddings, two views
    assert layers["step"].tolist() == [10] * n + [20] * n + [30] * n
    assert layers["revision"].tolist() == ["checkpoint-10"] * n + ["checkpoint-20"] * n + ["checkpoint-30"] * n
    assert set(layers["model"]) == {"my-run"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "my-run_checkpoint-10", "my-run_checkpoint-20", "my-run_checkpoint-30"]
    assert sum("analysing" in m for m in messages) == 3
    # The rows of step 20 are those of checkpoint-20 analysed on its own.
    alone = analyze(str(trainer_dir / "checkpoint-20"), str(lee_corpus), **OPTIONS).layers
    mine = layers[layers["step"] == 20].reset_index(drop=True)
    for col in ("n_tokens", "Q", "V", "anisotropy", "mean_cosine"):
        np.testing.assert_allclose(mine[col].to_numpy(float), alone[col].to_numpy(float), rtol=1e-12)
    # Different checkpoints give different numbers (so the order check above means something).
    assert layers.loc[layers["step"] == 10, "Q"].iloc[-1] != layers.loc[layers["step"] == 30, "Q"].iloc[-1]
    assert res.layers["step"].tolist() == layers["step"].tolist()

    first = {f: (out / f).read_bytes() for f in ("layers.csv", "run.json")}
    first_spectrum = pd.read_parquet(out / "spectrum.parquet")
    calls = []

    def no_analysis(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a finished checkpoint was analysed again")

    monkeypatch.setattr(embgeom.pipeline, "analyze", no_analysis)
    messages.clear()
    monkeypatch.chdir(trainer_dir.parent)  # the same checkpoints, named by a relative path
    again = expand_targets(["my-run"])
    assert again[0].spec != targets[0].spec
    run_sweep(again, str(lee_corpus), out, progress=False, figures=False, say=messages.append,
              batch_size=3, **OPTIONS)  # batch size does not change what is measured
    assert calls == []
    assert sum("finished earlier" in m for m in messages) == 3
    assert {f: (out / f).read_bytes() for f in first} == first
    pd.testing.assert_frame_equal(pd.read_parquet(out / "spectrum.parquet"), first_spectrum)

    # Other options: every checkpoint is analysed again.
    with pytest.raises(AssertionError, match="analysed again"):
        run_sweep(targets, str(lee_corpus), out, progress=False, figures=False, say=messages.append,
                  **{**OPTIONS, "max_tokens": 200})
    assert len(calls) == 1
    assert not (out / "layers.csv").exists()  # an unfinished sweep leaves no layers.csv
    record = json.loads((out / "checkpoints" / "my-run_checkpoint-10" / "sweep-target.json").read_text())
    assert record["target"]["step"] == 10 and record["options"]["max_tokens"] == 300


def test_cli_sweep_resumes_and_single_model_keeps_plain_layout(trainer_dir, tiny_models, lee_corpus, tmp_path,
                                                               capsys):
    from test_cli import run_cli

    out = tmp_path / "cli"
    argv = ["run", str(trainer_dir), "--corpus", str(lee_corpus), "--out", str(out), "--max-tokens", "300",
            "--seq-len", "64", "--id-sample", "0", "--device", "cpu", "--no-progress", "--no-figures",
            "--revision", "checkpoint-10",
            "--revision", "checkpoint-30"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert sorted(set(pd.read_csv(out / "layers.csv")["step"])) == [10, 30]
    code, err = run_cli(argv, capsys)
    assert code == 0 and err.count("finished earlier") == 2, err
    code, err = run_cli(argv[:-4] + ["--step", "1", "--step", "2", "--step", "3"] + argv[-4:], capsys)
    assert code == 2 and "--step was given 3 time(s) but there are 2 checkpoints" in err

    plain = tmp_path / "plain"
    code, err = run_cli(["run", str(trainer_dir / "checkpoint-20"), "--corpus", str(lee_corpus), "--out", str(plain),
                         "--max-tokens", "300", "--seq-len", "64", "--no-progress", "--no-figures"], capsys)
    assert code == 0, err
    assert not (plain / "checkpoints").exists()
    layers = pd.read_csv(plain / "layers.csv")
    assert layers["step"].isna().all() and set(layers["model"]) == {"checkpoint-20"}


def test_training_figures(tmp_path):
    from embgeom.plots_training import has_dynamics, pick_layers, plot_training
    from embgeom.results import Result, layers_frame

    rows = []
    for step in (0, 10, 100, 1000, 10000):
        for layer in range(5):
            for view in ("all", "inliers"):
                rows.append(dict(model="m", revision=f"step{step}", step=step, stack="decoder", layer=layer,
                                 n_layers=4, depth=layer / 4, view=view, V=2.0, V_within=1.0 + layer / 10,
                                 anisotropy=0.1 + layer * step / 1e5 + (view == "all") * 0.5))
    layers = layers_frame(rows)  # id_twonn all NaN: its panels are left out
    assert has_dynamics(layers) and not has_dynamics(layers[layers["step"] == 10])
    assert pick_layers(4) == [0, 1, 2, 3, 4] and pick_layers(30) == [0, 8, 15, 22, 30]
    run = {"training": {"model": "m", "log": [{"step": s, "loss": 5 - s / 5000} for s in range(10, 10001, 10)]}}
    written = plot_training([Result(layers=layers, run=run)], tmp_path)
    assert sorted(p.name for p in written) == ["training_dynamics_m_decoder.png", "training_heatmaps_m_decoder.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    # Layers with a single step make no training figure.
    assert plot_training([Result(layers=layers[layers["step"] == 10])], tmp_path / "none") == []


def test_a_checkpoint_retrained_in_place_is_analysed_again(trainer_dir, lee_corpus, tmp_path):
    """Reuse is keyed on the checkpoint's files (sizes and times), not its path: new
    weights in the same folder give the numbers of a fresh run."""
    import shutil
    import time

    import torch
    import transformers as tf

    run = tmp_path / "my-run"
    shutil.copytree(trainer_dir, run)
    out = tmp_path / "sweep"
    targets = expand_targets([str(run / "checkpoint-10"), str(run / "checkpoint-20")])
    run_sweep(targets, str(lee_corpus), out, progress=False, figures=False, say=None, **OPTIONS)
    old = pd.read_csv(out / "layers.csv")
    time.sleep(0.05)
    model = tf.GPT2LMHeadModel.from_pretrained(run / "checkpoint-20")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(run / "checkpoint-20")  # retrained in place: same path, same sizes
    messages = []
    run_sweep(targets, str(lee_corpus), out, progress=False, figures=False, say=messages.append, **OPTIONS)
    assert sum("finished earlier" in m for m in messages) == 1
    assert sum("other weights; analysing again" in m for m in messages) == 1
    new = pd.read_csv(out / "layers.csv")
    fresh = analyze(str(run / "checkpoint-20"), str(lee_corpus), **OPTIONS).layers
    mine = new[new["revision"] == "checkpoint-20"].reset_index(drop=True)
    for col in ("n_tokens", "Q", "V", "anisotropy", "mean_cosine"):
        np.testing.assert_allclose(mine[col].to_numpy(float), fresh[col].to_numpy(float), rtol=1e-12)
    assert not np.allclose(mine["Q"].to_numpy(float), old.loc[old["revision"] == "checkpoint-20", "Q"].to_numpy(float))
    kept = new[new["revision"] == "checkpoint-10"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, old[old["revision"] == "checkpoint-10"].reset_index(drop=True))


def test_every_target_is_checked_before_the_first_is_analysed(trainer_dir, tiny_models, lee_corpus, tmp_path,
                                                              capsys, monkeypatch):
    import shutil

    from test_cli import run_cli

    calls = []
    monkeypatch.setattr(embgeom.pipeline, "analyze", lambda *a, **k: calls.append(a))
    broken = tmp_path / "broken"
    shutil.copytree(trainer_dir / "checkpoint-10", broken)
    (broken / "config.json").write_text("{not json")
    for second, match in [(str(trainer_dir / "checkpoint-2O"), "checkpoint-2O does not exist"),
                          (str(broken), str(broken)),
                          ("no-such-org/no-such-model", "no-such-org/no-such-model is neither")]:
        out = tmp_path / "out"
        argv = ["run", str(trainer_dir / "checkpoint-10"), second, "--corpus", str(lee_corpus), "--out", str(out),
                "--max-tokens", "300", "--seq-len", "64", "--id-sample", "0", "--device", "cpu", "--no-progress",
                "--no-figures"]
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        code, err = run_cli(argv, capsys)
        assert code == 2 and match in err and err.count("\n") == 1, err
        assert calls == [] and not (out / "checkpoints").exists()
    # The memory plan is checked for every target too: the second does not fit.
    import embgeom.memory as memory

    asked = []

    def room(device):
        asked.append(device)
        return None if len(asked) == 1 else 1000  # unknown for the first target, 1000 bytes after

    monkeypatch.setattr(memory, "available_bytes", room)
    argv[2] = str(trainer_dir / "checkpoint-20")
    code, err = run_cli(argv, capsys)
    assert code == 2 and "the statistics need about" in err and err.count("\n") == 1, err
    assert calls == [] and len(asked) == 2

"""Geometry during training: the Trainer callback and the plain-loop probe."""
import numpy as np
import pandas as pd
import pytest
import torch

from embgeom import EmbgeomError
from embgeom.callback import GeometryCallback, GeometryProbe, headline_metrics, measure
from embgeom.results import LAYER_COLUMNS

PROBE = dict(max_tokens=200, seq_len=48, id_sample=0)  # no ID: keeps the test fast


@pytest.fixture()
def gpt2(tiny_models):
    import transformers as tf

    model = tf.GPT2LMHeadModel.from_pretrained(tiny_models["gpt2"])
    tok = tf.AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    return model, tok


def _modes(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_trainer_callback_records_schedule_and_restores_model(gpt2, lee_corpus, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    model, tok = gpt2
    texts = lee_corpus.read_text().splitlines()[:32]
    train = [{"input_ids": tok(t, truncation=True, max_length=24)["input_ids"]} for t in texts]
    model.transformer.wte.weight.requires_grad_(False)  # a frozen part stays frozen
    flags = [p.requires_grad for p in model.parameters()]

    class Spy(TrainerCallback):  # runs right after the geometry callback at each step
        seen = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.append(_modes(model))

    cb = GeometryCallback(texts[:8], every=2, out=tmp_path / "geometry", **PROBE)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=5, per_device_train_batch_size=4,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[cb, Spy()])
    trainer.train()

    assert cb.steps == [0, 2, 4, 5]
    assert sorted(cb.seconds) == [0, 2, 4, 5] and all(v > 0 for v in cb.seconds.values())
    layers = cb.layers
    assert list(layers.columns[: len(LAYER_COLUMNS)]) == LAYER_COLUMNS and "train_loss" in layers.columns
    assert layers["step"].tolist() == [s for s in (0, 2, 4, 5) for _ in range(8)]  # 4 layers x 2 views
    assert layers["revision"].tolist()[::8] == ["step0", "step2", "step4", "step5"]
    # Training moves the hidden states; step 0 is the untrained model.
    q = layers[(layers["layer"] == 3) & (layers["view"] == "all")]["Q"].to_numpy()
    assert q[0] != q[-1]
    # The loss the trainer logged at each measured step (none before the first step).
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4, 5]
    per_step = layers.groupby("step")["train_loss"].first()
    assert np.isnan(per_step[0])
    assert [per_step[s] for s in (2, 4, 5)] == pytest.approx([losses[2], losses[4], losses[5]])
    # Headline numbers went through Trainer.log: in log_history at the measured steps.
    logged = [e for e in trainer.state.log_history if "geometry/anisotropy/mean" in e]
    assert [e["step"] for e in logged] == [0, 2, 4, 5]
    first = layers[(layers["step"] == 0) & (layers["view"] == "all")]
    assert logged[0]["geometry/anisotropy/mean"] == pytest.approx(first["anisotropy"].mean())
    assert logged[0]["geometry/anisotropy/layer_3"] == pytest.approx(first["anisotropy"].iloc[3])
    # The model trained in train mode between measurements; flags untouched.
    assert len(Spy.seen) == 5 and all(all(modes) for modes, _ in Spy.seen)
    assert all(f == flags for _, f in Spy.seen)
    assert [p.requires_grad for p in model.parameters()] == flags
    # Files: layers.csv with every step, the loss log, the training figures.
    out = tmp_path / "geometry"
    saved = pd.read_csv(out / "layers.csv")
    assert saved["step"].tolist() == layers["step"].tolist()
    assert pd.read_csv(out / "training_log.csv")["step"].tolist() == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "training_dynamics_gpt2_decoder.png", "training_heatmaps_gpt2_decoder.png"]


def test_plain_loop_probe_restores_modes(gpt2, lee_corpus, tmp_path):
    model, tok = gpt2
    texts = lee_corpus.read_text().splitlines()[:8]
    model.train()
    model.transformer.h[1].eval()  # a mixed state comes back exactly
    model.lm_head.weight.requires_grad_(False)  # tied to wte: both frozen
    before = _modes(model)
    probe = GeometryProbe(texts, tok, out=tmp_path / "g", name="tiny", **PROBE)
    a = probe(model, 0)
    assert _modes(model) == before
    b = measure(model, tok, texts, 0, **PROBE)  # eval mode: dropout off, so the same numbers
    assert _modes(model) == before
    np.testing.assert_array_equal(a.layers["anisotropy"].to_numpy(), b.layers["anisotropy"].to_numpy())
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(3.0)
    probe(model, 10, train_loss=4.5)
    probe(model, 10, train_loss=4.25)  # measured again: replaces its rows
    assert probe.steps == [0, 10]
    layers = pd.read_csv(tmp_path / "g" / "layers.csv")
    assert layers["step"].tolist() == [0] * 8 + [10] * 8 and set(layers["model"]) == {"tiny"}
    assert layers.groupby("step")["train_loss"].first().tolist()[1] == 4.25
    last = layers[(layers["layer"] == 2) & (layers["view"] == "all")]["V"].to_numpy()
    assert last[1] > last[0]  # the scaled block (layer 2; layer 3 is after ln_f)
    result = probe.finish()
    assert (tmp_path / "g" / "figures" / "training_heatmaps_tiny_decoder.png").exists()
    assert result.run["training"]["steps"] == [0, 10]
    # A failing measurement restores the modes too.
    with pytest.raises(EmbgeomError, match="no non-blank document"):
        measure(model, tok, ["   "], 1, **PROBE)
    assert _modes(model) == before


def test_bad_arguments():
    with pytest.raises(EmbgeomError, match="every must be a positive"):
        GeometryCallback(["some text"], every=0)
    with pytest.raises(EmbgeomError, match="unknown option"):
        GeometryCallback(["some text"], every=1, max_token=5)
    with pytest.raises(EmbgeomError, match="does not exist"):
        GeometryProbe("/nonexistent/probe.txt")
    # the Python API names its own parameters, not the command line's flags
    with pytest.raises(EmbgeomError, match="seq_len must be a positive integer, got 0") as exc:
        GeometryProbe(["text"], seq_len=0)
    assert "--" not in str(exc.value)
    with pytest.raises(EmbgeomError, match="type_layers takes layer numbers") as exc:
        GeometryCallback(["some text"], every=1, type_layers="last")
    assert "--" not in str(exc.value)


def test_headline_metrics_names():
    rows = pd.DataFrame({
        "stack": ["decoder"] * 4, "layer": [0, 0, 1, 1], "view": ["all", "inliers"] * 2,
        "anisotropy": [0.2, 0.1, 0.4, 0.3], "id_twonn": [np.nan] * 4,
    })
    m = headline_metrics(rows)
    assert m == pytest.approx({
        "geometry/anisotropy/mean": 0.3, "geometry/anisotropy/layer_0": 0.2, "geometry/anisotropy/layer_1": 0.4,
        "geometry/anisotropy_inliers/mean": 0.2, "geometry/anisotropy_inliers/layer_0": 0.1,
        "geometry/anisotropy_inliers/layer_1": 0.3,
    })
    assert set(headline_metrics(rows, per_layer=False)) == {"geometry/anisotropy/mean",
                                                              "geometry/anisotropy_inliers/mean"}


def test_in_memory_models_are_named_as_the_command_line_names_them(tmp_path):
    """One naming rule: a model in memory gets the `model` column `embgeom run` gives
    the path or Hub id it was loaded from; GGUF stems, `model` folders and slugs too."""
    from types import SimpleNamespace

    from embgeom._names import display_name, slug
    from embgeom.probe import model_name

    (tmp_path / "run1" / "model").mkdir(parents=True)
    (tmp_path / "ckpt").mkdir()

    def named(path):
        return SimpleNamespace(config=SimpleNamespace(_name_or_path=path))

    assert model_name(named("EleutherAI/pythia-70m")) == display_name("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    assert model_name(named(str(tmp_path / "run1" / "model") + "/")) == "run1"
    assert model_name(named(str(tmp_path / "ckpt"))) == display_name(tmp_path / "ckpt") == "ckpt"
    assert model_name(named(""), "fallback") == "fallback" and model_name(named("")) == "SimpleNamespace"
    assert display_name("/x/SmolLM2-135M.Q4_1.gguf") == "SmolLM2-135M.Q4_1"
    assert slug("EleutherAI/pythia-70m", "step1000", "decoder") == "EleutherAI-pythia-70m_step1000_decoder"
    assert slug("", None, ".hidden/") == "hidden" and slug("///") == "model"

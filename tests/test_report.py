"""report.md: written with every saved run (after its tables and figures, before
layers.csv), read off the tables, links only to figures that exist, deterministic,
and sensible when metrics are missing."""
import re

import pytest

from embgeom import analyze
from embgeom.models import load_model
from embgeom.output import save_run
from embgeom.report import MAX_LAYER_TABLES, _fmt, report_markdown, write_report
from embgeom.results import Result, combine


@pytest.fixture(scope="module")
def gpt2_result(tiny_models, lee_corpus):
    texts = lee_corpus.read_text().splitlines()[:8]
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    return analyze(lm, texts, seq_len=48, batch_size=3, id_sample=300, outlier_factor=1.2)


def test_saved_run_has_a_report_with_its_numbers_and_figures(gpt2_result, tmp_path):
    out = save_run(gpt2_result, tmp_path / "run")
    text = (out / "report.md").read_text()
    layers = gpt2_result.layers
    assert text.startswith(f"# embgeom report: {layers['model'].iloc[0]}")
    assert "GPT2LMHeadModel (decoder, pre-LN), blocks: decoder 3, width 32" in text
    # one table row per layer, with the anisotropy of both views as in layers.csv
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    n_layers = int(layers["n_layers"].iloc[0])
    assert len(rows) == n_layers + 1
    a = layers[(layers["view"] == "all") & (layers["layer"] == 2)]["anisotropy"].iloc[0]
    assert f"| 2 | {a:.3g} /" in text
    peak = layers[layers["view"] == "all"]["anisotropy"].max()
    assert f"Anisotropy peaks at **{peak:.3g}**" in text
    # every image link points at a figure that was written
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((out / link).exists() for link in links)
    if len(gpt2_result.outliers):
        assert "massive activations" in text
    # the same Result gives the same text
    assert write_report(gpt2_result, out, out / "figures").read_text() == text


def test_report_without_figures_or_per_type_statistics_or_id(tiny_models, lee_corpus, tmp_path):
    texts = lee_corpus.read_text().splitlines()[:4]
    lm = load_model(str(tiny_models["bert"]), device="cpu")
    res = analyze(lm, texts, seq_len=48, batch_size=3, id_sample=0, token_types="none")
    out = save_run(res, tmp_path / "bare", figures=False)
    text = (out / "report.md").read_text()
    assert "## Figures" not in text and "![" not in text
    assert "Intrinsic dimension" not in text and "Variance within" not in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert rows and all(line.endswith("| – | – | – |") for line in rows)  # ID, V within / V, M–V slope
    assert text == report_markdown(Result.load(out), None, base=out)  # reloaded tables give the same report


def test_long_sweeps_get_one_summary_row_per_checkpoint(gpt2_result):
    parts = []
    for i in range(MAX_LAYER_TABLES + 2):
        layers = gpt2_result.layers.assign(revision=f"step{i}", step=i)
        parts.append(Result(layers=layers, run=gpt2_result.run))
    text = report_markdown(combine(parts))
    assert "## Checkpoints" in text and "## Layers" not in text
    summary = [line for line in text.splitlines() if line.startswith("| gpt2 | step")]
    assert len(summary) == MAX_LAYER_TABLES + 2
    assert f"… and {MAX_LAYER_TABLES + 1} more runs" in text


def test_per_type_figures_and_report_follow_the_type_layers(tiny_models, lee_corpus, tmp_path):
    """With --type-layers 1 3 on a 3-block model, the per-type figures default to the
    typed layer nearest the middle (1), and the report's within-type line names the
    first and last typed layers."""
    from embgeom.plots import types_layer

    texts = lee_corpus.read_text().splitlines()[:6]
    res = analyze(str(tiny_models["gpt2"]), texts, seq_len=48, batch_size=3, device="cpu", id_sample=0,
                  type_layers=(1, 3))
    assert types_layer(res.tokens, 3) == 1 and types_layer(res.tokens, 3, layer=3) == 3
    assert types_layer(res.tokens.iloc[:0], 3) == 1  # no per-type rows: the middle
    out = save_run(res, tmp_path / "typed")
    figs = {p.name for p in (out / "figures").iterdir()}
    assert any(n.startswith("types_vs_count_") for n in figs) and any(n.startswith("mv_scatter_") for n in figs)
    text = (out / "report.md").read_text()
    layers = res.layers[res.layers["view"] == "all"].set_index("layer")
    first = 100 * layers.loc[1, "V_within"] / layers.loc[1, "V"]
    assert f"Variance within token types: {_fmt(first, 2)}% of the variance at layer 1," in text
    assert text.split("Variance within token types:")[1].split("\n")[0].endswith("at layer 3.")


def test_save_run_writes_tables_then_figures_then_report_then_layers_csv(gpt2_result, tmp_path):
    """Result.save writes the tables alone; save_run draws once the tables are
    there, writes report.md after the figures, and layers.csv (a finished run) last."""
    tables = gpt2_result.save(tmp_path / "tables")
    assert sorted(p.name for p in tables.iterdir()) == [  # .embgeom.lock: who writes it (see _lock)
        ".embgeom.lock", "id_scale.parquet", "layers.csv", "layers.parquet", "outliers.csv", "run.json",
        "spectrum.parquet", "tokens.parquet"]
    seen = []

    def draw(results, figdir, warnings=None):
        out = figdir.parent
        seen.append(sorted(p.name for p in out.iterdir() if p.name != ".embgeom.lock"))
        figdir.mkdir()
        (figdir / "layer_profiles.png").write_bytes(b"png")
        return [figdir / "layer_profiles.png"]

    out = tmp_path / "run"
    out.mkdir()
    (out / "layers.csv").write_text("stale")
    save_run(gpt2_result, out, draw=draw)
    assert seen == [["id_scale.parquet", "layers.parquet", "outliers.csv", "run.json", "spectrum.parquet",
                     "tokens.parquet"]]
    assert "](figures/layer_profiles.png)" in (out / "report.md").read_text()
    assert Result.load(out).layers.equals(Result.load(tables).layers)

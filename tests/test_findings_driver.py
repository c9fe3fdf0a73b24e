"""scripts/findings.py: which runs are skipped, resumed or run; and the template's
placeholders (no model is loaded: `embgeom run` is replaced by a recorder)."""
import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _module(name):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


findings = _module("findings")
render = _module("findings_render")

MODEL, SHA = Path("/models/m"), "ab" * 32
OPTIONS = findings.run_options(50000, 128, 10000)


def finished(out: Path, model=MODEL, sha=SHA, **config):
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"max_tokens": 50000, "seq_len": 128, "id_sample": 10000, "batch_size": 16, "model": str(model), **config}
    (out / "run.json").write_text(json.dumps({"config": cfg, "corpus": {"sha256": sha, "path": "/x/corpus.txt"}}))
    (out / "layers.csv").write_text("layer\n0\n")


class Recorder:
    def __init__(self, *codes):
        self.codes, self.calls = list(codes), []

    def __call__(self, cmd):
        self.calls.append(cmd)
        return self.codes.pop(0) if self.codes else 0


def ensure(out, execute, options=OPTIONS):
    return findings.ensure_run(MODEL, Path("/x/corpus.txt"), SHA, out, options, 8, say=lambda m: None,
                               execute=execute)


def test_a_finished_run_with_the_same_options_is_skipped(tmp_path):
    finished(tmp_path / "r", batch_size=4)  # the batch size changes speed, not numbers
    rec = Recorder()
    assert ensure(tmp_path / "r", rec) == "skipped"
    assert rec.calls == []


@pytest.mark.parametrize("change, why", [
    (dict(config=dict(max_tokens=20000)), "max_tokens was 20000"),
    (dict(config=dict(id_sample=5000)), "id_sample was 5000"),
    (dict(sha="cd" * 32), "another corpus"),
    (dict(model=Path("/models/other")), "another model"),
])
def test_a_run_made_otherwise_is_run_again(tmp_path, change, why):
    finished(tmp_path / "r", model=change.get("model", MODEL), sha=change.get("sha", SHA), **change.get("config", {}))
    done, reason = findings.finished_run(tmp_path / "r", MODEL, SHA, OPTIONS)
    assert not done and why in reason
    rec = Recorder()
    assert ensure(tmp_path / "r", rec) == "ran"
    cmd = rec.calls[0]
    assert cmd[cmd.index("run") + 1] == str(MODEL) and "--resume" not in cmd
    assert cmd[cmd.index("--max-tokens") + 1] == "50000" and cmd[cmd.index("--id-sample") + 1] == "10000"
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "r") and cmd[cmd.index("--batch-size") + 1] == "8"


def test_an_unfinished_run_without_snapshot_runs_and_a_failure_stops(tmp_path):
    rec = Recorder(0)
    assert ensure(tmp_path / "r", rec) == "ran"
    with pytest.raises(SystemExit, match="failed.*exit status 1"):
        ensure(tmp_path / "r", Recorder(1))


def test_an_interrupted_run_continues_from_its_snapshot(tmp_path):
    (tmp_path / "r" / "snapshots").mkdir(parents=True)
    (tmp_path / "r" / "snapshots" / "rank0-of-1.pt").write_bytes(b"")
    rec = Recorder(0)
    assert ensure(tmp_path / "r", rec) == "resumed"
    assert len(rec.calls) == 1 and rec.calls[0][-1] == "--resume"
    # a snapshot that cannot be resumed (other options): started over, without --resume
    rec = Recorder(2, 0)
    assert ensure(tmp_path / "r", rec) == "ran"
    assert [c[-1] == "--resume" for c in rec.calls] == [True, False]


def test_protocol_runs_record_the_protocol_and_their_own_id_options():
    a, b = findings.run_options(20000, 128, 10000, "paper-a"), findings.run_options(20000, 128, 10000, "paper-b")
    assert a == {"max_tokens": 20000, "seq_len": 128, "protocol": "paper-a"}  # its preset picks the ID tokens
    assert b == {"max_tokens": 20000, "seq_len": 128, "id_sample": 0, "protocol": "paper-b"}
    cmd = findings.command(MODEL, Path("c.txt"), Path("o"), a, 16, resume=False)
    assert cmd[cmd.index("--protocol") + 1] == "paper-a" and "--id-sample" not in cmd


def test_a_finished_protocol_run_is_recognised_by_its_protocol(tmp_path):
    finished(tmp_path / "r", max_tokens=20000, protocol="paper-b", id_sample=0)
    assert findings.finished_run(tmp_path / "r", MODEL, SHA, findings.run_options(20000, 128, 10000, "paper-b"))[0]
    assert not findings.finished_run(tmp_path / "r", MODEL, SHA, findings.run_options(20000, 128, 10000, "paper-a"))[0]


def test_template_placeholders():
    layers = pd.DataFrame({"view": ["all", "all"], "layer": [0, 1], "anisotropy": [0.25, 0.987654]})
    runs = {"M": type("R", (), {"layers": layers})()}
    text = render.fill("a {{x}} b {{ layer:M:all:anisotropy:1 }}", {"x": "1,000"}, runs)
    assert text == "a 1,000 b 0.988"
    with pytest.raises(SystemExit, match="unknown placeholder"):
        render.fill("{{nope}}", {}, runs)
    with pytest.raises(SystemExit, match="do not hold"):
        render.fill("{{layer:M:inliers:anisotropy:1}}", {}, runs)


def test_the_template_uses_only_known_placeholders():
    names = set(render._PLACEHOLDER.findall((SCRIPTS / "findings_template.md").read_text()))
    known = {"models_table", "claims_by_claim", "outliers_table", "contradictions", "new_measures", "protocols",
             "max_tokens", "seq_len", "id_sample", "outlier_factor", "corpus_file", "corpus_sha256",
             "model_figures", "outlier_figures", "norm_contrast"}
    assert {n.strip() for n in names if not n.strip().startswith("layer:")} <= known


def test_render_from_two_tiny_runs(tiny_models, lee_corpus, tmp_path):
    """The whole document from an encoder's and a decoder's saved tables: every
    placeholder filled, one row per claim and model, every figure it shows copied."""
    from embgeom import analyze

    plan = []
    for arch, name in (("bert", "tiny-encoder"), ("llama", "tiny-decoder")):
        res = analyze(str(tiny_models[arch]), str(lee_corpus), seq_len=32, max_tokens=400, id_sample=150,
                      device="cpu", progress=False)
        res.save(tmp_path / "runs" / arch)
        plan.append((name, tmp_path / "runs" / arch, None))
    docs = tmp_path / "docs"
    path = render.render(plan, tmp_path / "out", docs, SCRIPTS / "findings_template.md", protocols_run=False)
    text = path.read_text()
    assert "{{" not in text and "}}" not in text
    for claim in ("A1", "A2", "B1", "B2", "B3", "B4"):
        assert text.count(f"**{claim}: ") == 1
    for name in ("tiny-encoder", "tiny-decoder"):
        assert sum(line.startswith(f"| {name} | **") for line in text.splitlines()) == 6
    assert "not in this run" in text  # protocols, and the measures this embgeom lacks
    shown = set(render.re.findall(r"\(figures/([^)\s]+\.png)\)", text))
    assert "shares_tiny-decoder_decoder.png" in shown
    assert sum(line.startswith("| tiny-decoder | pre-LN | ") for line in text.splitlines()) == 1  # post-LN vs pre-LN
    assert shown == {p.name for p in (docs / "figures").iterdir()}
    # the encoder's anisotropy cell is read off its table
    enc = pd.read_csv(tmp_path / "runs" / "bert" / "layers.csv")
    lo, hi = enc[enc["view"] == "all"]["anisotropy"].agg(["min", "max"])
    assert f"| tiny-encoder | **✔** layers 0–2: {lo:.2f}–{hi:.2f} |" in text
    # a protocol run is judged by the same rules, beside embgeom's defaults
    main = {"tiny-encoder": render.load("tiny-encoder", tmp_path / "runs" / "bert")}
    section = render.protocol_section(main, {("tiny-encoder", "paper-a"): main["tiny-encoder"]}, True)
    assert f"| A1 | tiny-encoder | **✔** layers 0–2: {lo:.2f}–{hi:.2f} | paper-a (400 tokens): **✔** " in section
    assert "| A2 | tiny-encoder |" in section and "| B1 |" not in section


def test_new_measures_are_reported_when_their_columns_exist():
    def run(**cols):
        df = pd.DataFrame({"view": ["all"] * 4, "layer": [0, 1, 2, 3], **cols})
        return type("R", (), {"layers": df, "id_scale": None})()

    absent = render.new_measures({"m": run(anisotropy=[0.1, 0.2, 0.3, 0.4])})
    assert "linear CKA and linearity, curvature and prompt entropy: not in this run" in absent
    assert "GRIDE plateau): not in this run" in absent
    present = render.new_measures({"m": run(linear_cka=[float("nan"), 0.9, 0.5, 0.7])})
    assert "| m | all | 0.5 (layer 2) – 0.9, median 0.7 |" in present
    assert "figures/profile_linear_cka.png" in present and "curvature" not in present

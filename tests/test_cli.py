"""The command line: a real run, and every bad input answered with one line and exit 2."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embgeom.cli import main


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exc.value.code, captured.err


def test_run_writes_tables_and_figures(tiny_models, lee_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["run", str(tiny_models["bert"]), "--corpus", str(lee_corpus), "--out", str(out),
                         "--max-tokens", "400", "--seq-len", "64", "--no-progress"], capsys)
    assert code == 0, err
    assert (out / "layers.csv").exists() and (out / "figures" / "layer_profiles.png").exists()
    code, err = run_cli(["plot", str(out), str(out), "--out", str(tmp_path / "figs")], capsys)
    assert code == 0, err
    assert (tmp_path / "figs" / "profile_anisotropy.png").exists()
    assert (out / "report.md").exists()
    report = (tmp_path / "figs" / "report.md").read_text()  # the runs side by side, figures beside it
    assert "](layer_profiles.png)" in report and "## Layers: bert, encoder" in report
    # the per-type figures at a chosen layer; a layer the model lacks is refused
    code, err = run_cli(["plot", str(out), "--out", str(tmp_path / "figs1"), "--layer", "1"], capsys)
    assert code == 0, err
    assert any(p.name.startswith("types_vs_count_") for p in (tmp_path / "figs1").iterdir())
    code, err = run_cli(["plot", str(out), "--out", str(tmp_path / "figs2"), "--layer", "99"], capsys)
    _assert_one_line_exit_2(code, err, "--layer 99", tmp_path / "figs2")
    assert not (tmp_path / "figs2").exists()


def test_min_and_max_count_choose_the_tradeoff_types(tiny_models, lee_corpus, tmp_path, capsys):
    import pandas as pd

    counts = {}
    for lo, hi in ((1, 100000), (5, 100000), (5, 8)):
        out = tmp_path / f"out-{lo}-{hi}"
        code, err = run_cli(["run", str(tiny_models["bert"]), "--corpus", str(lee_corpus), "--out", str(out),
                             "--max-tokens", "400", "--seq-len", "64", "--no-progress", "--no-figures",
                             "--id-sample", "0", "--min-count", str(lo), "--max-count", str(hi)], capsys)
        assert code == 0, err
        layers = pd.read_csv(out / "layers.csv")
        tokens = pd.read_parquet(out / "tokens.parquet")
        row = layers[(layers["layer"] == 1) & (layers["view"] == "all")].iloc[0]
        t = tokens[(tokens["layer"] == 1) & (tokens["view"] == "all")]
        assert row["n_types"] == ((t["n"] >= lo) & (t["n"] <= hi)).sum()
        counts[(lo, hi)] = row["n_types"]
    assert counts[(1, 100000)] > counts[(5, 100000)] > counts[(5, 8)] > 0


@pytest.fixture()
def bad_inputs(tiny_models, lee_corpus, tmp_path):
    """name -> (extra argv, substring the message must contain)."""
    import transformers as tf

    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine line\nbad \xff\xfe byte\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"body": "some text"}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    # A model whose second block produces NaN.
    nan_dir = tmp_path / "nan-model"
    m = tf.GPT2LMHeadModel.from_pretrained(tiny_models["gpt2"])
    with torch.no_grad():
        m.transformer.h[1].mlp.c_proj.bias.fill_(float("nan"))
    m.save_pretrained(nan_dir)
    tf.AutoTokenizer.from_pretrained(tiny_models["gpt2"]).save_pretrained(nan_dir)
    corrupt = tmp_path / "corrupt-model"
    corrupt.mkdir()
    for f in tiny_models["gpt2"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not really safetensors")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in tiny_models["gpt2"].iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (no_tok / f.name).write_bytes(f.read_bytes())
    notgguf = tmp_path / "fake.gguf"
    notgguf.write_bytes(b"PK\x03\x04 this is a zip")
    model, corpus = str(tiny_models["gpt2"]), str(lee_corpus)
    return {
        "missing model": ([str(tmp_path / "nope"), "--corpus", corpus], "does not exist"),
        "missing corpus": ([model, "--corpus", str(tmp_path / "nope.txt")], "does not exist"),
        "empty corpus": ([model, "--corpus", str(empty)], "no non-blank document"),
        "invalid utf-8": ([model, "--corpus", str(bad_utf8)], "--encoding-errors replace"),
        "missing text field": ([model, "--corpus", str(jsonl)], "text"),
        "zero batch size": ([model, "--corpus", corpus, "--batch-size", "0"], "--batch-size"),
        "negative max tokens": ([model, "--corpus", corpus, "--max-tokens", "-5"], "--max-tokens"),
        "non-numeric option": ([model, "--corpus", corpus, "--seq-len", "abc"], "seq-len"),
        "seq-len past limit": ([model, "--corpus", corpus, "--seq-len", "4096"],
                               "--seq-len 4096 is longer than this model accepts (128 positions); use --seq-len 128 or less"),
        "out is a file": ([model, "--corpus", corpus, "--out-override", str(a_file)], "is a file"),
        "cuda without gpu": ([model, "--corpus", corpus, "--device", "cuda"], "no CUDA GPU"),
        "unknown dtype": ([model, "--corpus", corpus, "--dtype", "float8"], "--dtype"),
        "non-finite hidden states": ([str(nan_dir), "--corpus", corpus], "layer 2"),
        "corrupt weights": ([str(corrupt), "--corpus", corpus], "could not load model"),
        "not a gguf": ([str(notgguf), "--corpus", corpus], "not a GGUF file"),
        "bad outlier factor": ([model, "--corpus", corpus, "--outlier-factor", "0.5"], "--outlier-factor"),
        "missing tokenizer": ([str(no_tok), "--corpus", corpus], "no tokenizer"),
        "resume without snapshot": ([model, "--corpus", corpus, "--resume"], "no snapshot"),
        "bad device map": ([model, "--corpus", corpus, "--device-map", "everywhere"], "--device-map"),
        "negative snapshot interval": ([model, "--corpus", corpus, "--snapshot-every", "-1"], "--snapshot-every"),
        "min count above max count": ([model, "--corpus", corpus, "--min-count", "50", "--max-count", "5"],
                                      "--min-count"),
        "type layer past the model": ([model, "--corpus", corpus, "--type-layers", "-1", "--type-layers", "40"],
                                      "--type-layers 40 is not a layer"),
        "type layers without types": ([model, "--corpus", corpus, "--type-layers", "0", "--token-types", "none"],
                                      "drop one of the two"),
    }


CASES = ["missing model", "missing corpus", "empty corpus", "invalid utf-8", "missing text field",
         "zero batch size", "negative max tokens", "non-numeric option", "seq-len past limit", "out is a file",
         "cuda without gpu", "unknown dtype", "non-finite hidden states", "corrupt weights", "not a gguf",
         "bad outlier factor", "missing tokenizer", "resume without snapshot", "bad device map",
         "negative snapshot interval", "min count above max count", "type layer past the model",
         "type layers without types"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_exit_2(bad_inputs, case, tmp_path, capsys):
    if case == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv, needle = bad_inputs[case]
    out = tmp_path / "result"
    if "--out-override" in argv:
        i = argv.index("--out-override")
        out = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    defaults = {"--max-tokens": "200", "--seq-len": "64"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv = [*argv, flag, value]
    code, err = run_cli(["run", *argv, "--out", str(out), "--no-progress"], capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "result" / "layers.csv").exists()


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "embgeom", "run", str(tmp_path / "nope"), "--corpus",
                           str(tmp_path / "x.txt"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("embgeom: error:") and "Traceback" not in proc.stderr


def _assert_one_line_exit_2(code, err, needle, out):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not (out / "layers.csv").exists()


def test_unwritable_output_directory(tiny_models, lee_corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: simulate the refusal the kernel gives others
        real = Path.write_text

        def refuse(self, *a, **k):
            if self.parent == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", refuse)
    code, err = run_cli(["run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus), "--out", str(out),
                         "--max-tokens", "200", "--seq-len", "64", "--no-progress"], capsys)
    out.chmod(0o755)
    _assert_one_line_exit_2(code, err, "cannot write to output directory", out)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_results(tiny_models, lee_corpus, tmp_path, capsys, monkeypatch):
    import pandas as pd

    monkeypatch.setattr(pd.DataFrame, "to_parquet", _disk_full)
    out = tmp_path / "full"
    code, err = run_cli(["run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus), "--out", str(out),
                         "--max-tokens", "200", "--seq-len", "64", "--no-progress"], capsys)
    _assert_one_line_exit_2(code, err, "No space left on device", out)
    assert "free space" in err


def test_disk_full_while_writing_a_snapshot(tiny_models, lee_corpus, tmp_path, capsys, monkeypatch):
    import embgeom.snapshot

    monkeypatch.setattr(embgeom.snapshot, "write_state", _disk_full)
    out = tmp_path / "full"
    code, err = run_cli(["run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus), "--out", str(out),
                         "--max-tokens", "3000", "--seq-len", "64", "--snapshot-every", "0", "--no-progress"],
                        capsys)
    _assert_one_line_exit_2(code, err, "the disk is full", out)
    assert not list((out / "snapshots").glob("*.tmp*"))  # no half-written snapshot left behind


def test_console_command_exits_fast_with_the_same_status_output_and_progress(tiny_models, lee_corpus, tmp_path):
    """`python -m embgeom` (like the `embgeom` script) skips the interpreter teardown
    after flushing: same exit status, complete output and files."""
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "embgeom", *args], capture_output=True, text=True, timeout=300)

    ok = run("run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus), "--out", str(tmp_path / "out"),
             "--seq-len", "32", "--max-tokens", "400", "--no-figures", "--id-sample", "0")
    assert ok.returncode == 0, ok.stderr
    assert "layers.csv" in ok.stderr and (tmp_path / "out" / "layers.csv").exists()
    # both progress bars, drawn to the end: tokens streamed, then layers whose metrics are done
    assert "400/400 tokens" in ok.stderr and "tok/s" in ok.stderr
    assert "metrics" in ok.stderr and "4/4 layers" in ok.stderr
    bad = run("run", str(tiny_models["gpt2"]), "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o2"))
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
    assert not (tmp_path / "o2" / "layers.csv").exists()
    usage = run("--help")
    assert usage.returncode == 0 and "Usage" in usage.stdout


def test_statistics_too_large_for_memory_are_refused_before_the_stream(tiny_models, lee_corpus, tmp_path, capsys,
                                                                       monkeypatch):
    """The per-type tables' final size is known after the tokenizer pre-pass: a run
    that cannot hold them is refused then, naming the sizes and the fix; with
    --token-types none the same run fits."""
    import json

    from embgeom import memory

    argv = ["run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus), "--max-tokens", "400", "--seq-len", "64",
            "--no-progress", "--no-figures", "--id-sample", "0"]
    code, err = run_cli([*argv, "--out", str(tmp_path / "none"), "--token-types", "none"], capsys)
    assert code == 0, err
    without_types = json.loads((tmp_path / "none" / "run.json").read_text())["planned_accumulator_bytes"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * without_types)
    code, err = run_cli([*argv, "--out", str(tmp_path / "none2"), "--token-types", "none"], capsys)
    assert code == 0, err
    out = tmp_path / "types"
    code, err = run_cli([*argv, "--out", str(out)], capsys)
    _assert_one_line_exit_2(code, err, "is available: per-type means", out)
    assert "token types x 4 hidden states x width 32 in float64" in err
    assert "For the per-type means: keep them at a few layers (--type-layers 0 -1 ...)" in err
    assert "--token-types none" in err


def test_model_loading_shows_what_it_does(tiny_models, tmp_path, capfd):
    """With progress on, transformers' weight-loading bar is shown, and a GGUF file
    gets a note before its (slow, one-time) dequantization; with progress off,
    loading is silent."""
    from embgeom import EmbgeomError
    from embgeom.models import gguf_fp32_copy, load_model

    load_model(str(tiny_models["llama"]), device="cpu")
    assert "Loading" not in capfd.readouterr().err
    load_model(str(tiny_models["llama"]), device="cpu", progress=True)
    assert "Loading" in capfd.readouterr().err
    notes = []
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EmbgeomError, match="could not read GGUF file"):
        gguf_fp32_copy(broken, tmp_path / "cache", progress=notes.append)
    assert notes and notes[0].startswith("dequantizing broken.gguf once (cached in ")


def test_bad_corpus_and_too_large_runs_are_refused_before_the_weights_load(tiny_models, lee_corpus, tmp_path,
                                                                          capsys, monkeypatch):
    """The tokenizer and config are read first, the corpus is read and counted, the
    memory is planned from the config, and only then do the weights load: a large
    model does not spend minutes loading before bad input is reported."""
    from embgeom import memory
    from embgeom.models import OpenedModel

    loads = []
    real_load = OpenedModel.load
    monkeypatch.setattr(OpenedModel, "load", lambda self, **kw: loads.append(self.spec) or real_load(self, **kw))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbroken \xff line\n")
    argv = ["run", str(tiny_models["t5"]), "--seq-len", "64", "--no-progress", "--no-figures", "--id-sample", "0"]
    code, err = run_cli([*argv, "--corpus", str(bad), "--out", str(tmp_path / "o1")], capsys)
    _assert_one_line_exit_2(code, err, "not valid UTF-8 at line 2", tmp_path / "o1")
    code, err = run_cli([*argv, "--corpus", str(lee_corpus), "--out", str(tmp_path / "o3"), "--resume"], capsys)
    _assert_one_line_exit_2(code, err, "--resume: no snapshot in", tmp_path / "o3")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    code, err = run_cli([*argv, "--corpus", str(lee_corpus), "--out", str(tmp_path / "o2")], capsys)
    _assert_one_line_exit_2(code, err, "but only 0.0 GiB is available", tmp_path / "o2")
    assert loads == []


@pytest.mark.parametrize("arch", ["gpt2", "bert", "t5"])
def test_config_shape_is_the_measured_shape(tiny_models, arch):
    from embgeom.models import open_model

    opened = open_model(str(tiny_models[arch]))
    stacks, width = opened.shape
    facts = opened.load(device="cpu").facts
    assert list(stacks.values()) == list(facts.n_layers.values()) and width == facts.width
    assert (opened.max_length, list(opened.special_prefix_suffix)) == (facts.max_length,
                                                                      [facts.special_prefix, facts.special_suffix])

"""Trustworthy run directories: nothing read back runs code, damaged snapshots are
refused, one run per output directory, a failed snapshot write loses nothing, and
the accumulators share one state protocol."""
from __future__ import annotations

import errno
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from embgeom import EmbgeomError, analyze
from embgeom._statefile import read_state, write_state
from embgeom.snapshot import Snapshots
from embgeom.stats.layers import LayerStatistics
from embgeom.stats.moments import Moments
from embgeom.stats.position_sample import PositionSample
from embgeom.stats.token_moments import TokenMoments
from test_cli import run_cli

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
OPTS = dict(seq_len=32, batch_size=4, device="cpu", id_sample=50, calibration_tokens=200)


class _Payload:
    """Unpickling this calls os.mkdir(marker): what a hostile file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _payload_file(path, marker):
    torch.save({"fingerprint": {}, "state": _Payload(marker)}, path)


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("embgeom: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def texts(lee_corpus):
    return lee_corpus.read_text().splitlines()[:3]


@pytest.fixture
def small_corpus(lee_corpus, tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n".join(lee_corpus.read_text().splitlines()[:8]) + "\n")
    return p


def _run_argv(model, corpus, out, *extra):
    return ["run", str(model), "--corpus", str(corpus), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
            "--id-sample", "50", "--device", "cpu", "--no-progress", "--no-figures", *extra]


# ------------------------------------------------------------ 1: nothing runs code


def test_the_payload_is_live(tmp_path):
    """The crafted file does run code when unpickled, so the tests below can fail."""
    marker = tmp_path / "ran"
    _payload_file(tmp_path / "p.pt", marker)
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["rank0-of-1.safetensors", "rank0-of-1.pt"])
def test_a_pickle_as_snapshot_does_not_run(tiny_models, small_corpus, tmp_path, capsys, name):
    out, marker = tmp_path / "out", tmp_path / "ran"
    (out / "snapshots").mkdir(parents=True)
    _payload_file(out / "snapshots" / name, marker)
    code, err = run_cli(_run_argv(tiny_models["gpt2"], small_corpus, out, "--resume"), capsys)
    assert code == 2
    line = _one_line(err)
    assert ("is damaged" in line) if name.endswith(".safetensors") else ("older embgeom" in line)
    assert not marker.exists()
    with pytest.raises(EmbgeomError, match="damaged|older embgeom"):
        analyze(str(tiny_models["gpt2"]), str(small_corpus), snapshot_dir=out / "snapshots", resume=True, **OPTS)
    assert not marker.exists() and not (out / "layers.csv").exists()


@pytest.mark.parametrize("victim", ["layers.parquet", "run.json", "spectrum.parquet", "outliers.csv"])
def test_a_pickle_in_a_finished_run_does_not_run(tiny_models, small_corpus, tmp_path, capsys, victim):
    out, marker = tmp_path / "out", tmp_path / "ran"
    code, err = run_cli(_run_argv(tiny_models["gpt2"], small_corpus, out), capsys)
    assert code == 0, err
    _payload_file(out / victim, marker)
    code, err = run_cli(["plot", str(out), "--out", str(tmp_path / "figs")], capsys)
    assert not marker.exists()
    if victim != "outliers.csv":  # a CSV reader reads a pickle as some odd text
        assert code == 2 and victim in _one_line(err)


def test_state_file_round_trip_of_every_accumulator(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) + 4
    m = Moments(6).update(x)
    t = TokenMoments(6).update(x, rng.integers(0, 7, 50))
    p = PositionSample(20, 2, 6, seed=1).update(np.arange(50), np.stack([x, 2 * x]).astype(np.float32),
                                                 {"token_id": np.arange(50) % 7})
    with open(tmp_path / "s", "wb") as fh:
        write_state(fh, {"m": m.state_dict(), "t": t.state_dict(), "p": p.state_dict(), "nan": float("nan")})
    back = read_state(tmp_path / "s")
    assert np.isnan(back["nan"])
    assert np.array_equal(Moments.from_state_dict(back["m"]).covariance, m.covariance)
    assert TokenMoments.from_state_dict(back["t"]).table().equals(t.table())
    q = PositionSample.from_state_dict(back["p"])
    assert (q.keys == p.keys).all() and np.array_equal(q.layer(1), p.layer(1))
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(tmp_path / "s"), framework="pt") as f:  # a standard layout
        assert f.metadata()["format"] == "embgeom-state-1" and len(list(f.keys())) > 0


# ------------------------------------------------------------ 2: damaged snapshots


@pytest.fixture(scope="module")
def first_snapshot(tiny_models, texts, tmp_path_factory):
    snaps = tmp_path_factory.mktemp("first") / "snaps"
    first = analyze(str(tiny_models["gpt2"]), texts, snapshot_dir=snaps, snapshot_every=0, **OPTS)
    assert (snaps / "rank0-of-1.safetensors").exists()
    return snaps, first


@pytest.fixture
def snapshot(first_snapshot, tmp_path):
    """A copy of a finished run's last snapshot, and the run's result."""
    snaps = tmp_path / "snaps"
    shutil.copytree(first_snapshot[0], snaps)
    return snaps, snaps / "rank0-of-1.safetensors", first_snapshot[1]


def _resume(tiny_models, texts, snaps):
    return analyze(str(tiny_models["gpt2"]), texts, snapshot_dir=snaps, resume=True, **OPTS)


def _tensor_span(path, key):
    """Byte range in the file of the first tensor stored under `key`."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    doc = header["__metadata__"]["state"]
    name = json.loads(doc[doc.index(f'"{key}":') + len(key) + 3:].split("}", 1)[0] + "}")["$tensor"]
    a, b = header[name]["data_offsets"]
    return 8 + n + a, 8 + n + b


def test_snapshot_round_trip_resumes_exactly(tiny_models, texts, snapshot):
    snaps, _, first = snapshot
    again = _resume(tiny_models, texts, snaps)
    assert again.layers.equals(first.layers)


def test_overwritten_bytes_are_refused(tiny_models, texts, snapshot):
    snaps, path, _ = snapshot
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = os.urandom(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(EmbgeomError, match="is damaged .*checksum"):
        _resume(tiny_models, texts, snaps)


def test_a_tripled_covariance_value_is_refused(tiny_models, texts, snapshot):
    snaps, path, _ = snapshot
    a, _ = _tensor_span(path, "scatter")
    raw = bytearray(path.read_bytes())
    value = np.frombuffer(bytes(raw[a + 8:a + 16]), dtype="<f8")[0]  # entry (0, 1)
    raw[a + 8:a + 16] = np.array([3 * value], dtype="<f8").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(EmbgeomError, match="is damaged .*checksum"):
        _resume(tiny_models, texts, snaps)


def _rewrite(path, change):
    """Edit the saved state and write it back with a valid checksum (a forged file)."""
    saved = read_state(path)
    change(saved["state"])
    with open(path, "wb") as fh:
        write_state(fh, saved)


@pytest.mark.parametrize("change, match", [
    (lambda s: s.update(next_batch=s["next_batch"] - 1), "next_batch"),
    (lambda s: s.update(next_batch=s["next_batch"] + 5), "next_batch"),
    (lambda s: s.update(next_batch=0), "next_batch is 0"),
    (lambda s: s.update(tokens_done=s["tokens_done"] // 10), "next_batch"),
    (lambda s: s["n_seen"].update(decoder=s["n_seen"]["decoder"] + 1), "tokens counted"),
    (lambda s: s["statistics"]["inliers"]["decoder"][1]["moments"].update(n=-3), "n must be >= 0"),
    (lambda s: s["statistics"]["inliers"]["decoder"][1]["moments"].update(n=2.5), "n must be an integer"),
    (lambda s: s["statistics"]["inliers"]["decoder"][1]["moments"]["scatter"][0, 1].mul_(3), "not symmetric"),
    (lambda s: s["statistics"]["inliers"]["decoder"][0]["types"]["m2"].__setitem__(0, -1.0), "negative"),
])
def test_a_forged_snapshot_is_refused(tiny_models, texts, snapshot, change, match):
    """Edited and given a valid checksum, a state that does not fit together is still
    refused, never resumed into other numbers."""
    snaps, path, _ = snapshot
    _rewrite(path, change)
    with pytest.raises(EmbgeomError, match=f"is damaged.*{match}"):
        _resume(tiny_models, texts, snaps)


def test_a_damaged_snapshot_is_one_line_on_the_command_line(tiny_models, small_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    analyze(str(tiny_models["gpt2"]), str(small_corpus), snapshot_dir=out / "snapshots", snapshot_every=0, **OPTS)
    path = out / "snapshots" / "rank0-of-1.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-64:] = bytes(64)
    path.write_bytes(bytes(raw))
    code, err = run_cli(_run_argv(tiny_models["gpt2"], small_corpus, out, "--resume"), capsys)
    assert code == 2 and "is damaged" in _one_line(err)
    assert not (out / "layers.csv").exists()


# ------------------------------------------------------------ 16.5: one protocol


def _filled():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    return {
        Moments: Moments(5).update(x),
        TokenMoments: TokenMoments(5).update(x, rng.integers(0, 6, 40)),
        PositionSample: PositionSample(10, 1, 5).update(np.arange(40), x[None].astype(np.float32)),
    }


@pytest.mark.parametrize("cls", [Moments, TokenMoments, PositionSample, LayerStatistics])
def test_one_accumulator_protocol(cls):
    for name in ("update", "merge", "state_dict", "to"):
        assert callable(getattr(cls, name))
    params = list(inspect.signature(cls.from_state_dict).parameters.values())
    assert [p.name for p in params[:2]] == ["sd", "device"] and params[1].default is None
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])


@pytest.mark.parametrize("cls", [Moments, TokenMoments, PositionSample])
def test_state_dicts_carry_kind_and_version(cls):
    acc = _filled()[cls]
    sd = acc.state_dict()
    assert sd["kind"] == cls.__name__ and sd["version"] == 1
    assert acc.to("cpu") is acc
    back = cls.from_state_dict(sd, device="cpu")
    assert back.state_dict().keys() == sd.keys()
    with pytest.raises(EmbgeomError, match=f"{cls.__name__} state_dict has version 99"):
        cls.from_state_dict(dict(sd, version=99))
    with pytest.raises(EmbgeomError, match="version None"):
        cls.from_state_dict({k: v for k, v in sd.items() if k != "version"})


def test_moments_refusals():
    sd = _filled()[Moments].state_dict()
    for change, match in [
        (dict(n=-1), "n must be >= 0"), (dict(n=2.5), "n must be an integer"),
        (dict(n_nonzero=10**6), "n_nonzero must be between"), (dict(mean=torch.zeros(4)), "mean has shape"),
        (dict(mean=torch.full((5,), float("nan"))), "NaN"), (dict(scatter=torch.zeros(5, 4)), "scatter has shape"),
        (dict(unit_sum=torch.full((5,), 1e6, dtype=torch.float64)), "unit_sum has norm"),
    ]:
        with pytest.raises(EmbgeomError, match=match):
            Moments.from_state_dict(dict(sd, **change))
    neg = sd["scatter"].clone()
    neg[2, 2] = -1.0
    with pytest.raises(EmbgeomError, match="diagonal of scatter"):
        Moments.from_state_dict(dict(sd, scatter=neg))
    big = sd["scatter"].clone()
    big[0, 1] = big[1, 0] = 10 * (big[0, 0] * big[1, 1]).sqrt()
    with pytest.raises(EmbgeomError, match="not a covariance"):
        Moments.from_state_dict(dict(sd, scatter=big))
    m = Moments.from_state_dict(sd).to("cpu")
    assert m.n == 40 and np.allclose(m.covariance, _filled()[Moments].covariance, rtol=0, atol=0)


def test_token_moments_and_sample_refusals():
    sd = _filled()[TokenMoments].state_dict()
    for change, match in [
        (dict(n=-40), "n must be >= 0"), (dict(m2=-sd["m2"]), "negative"),
        (dict(mean=sd["mean"][:, :3]), "mean has shape"), (dict(counts=sd["counts"].double()), "integers"),
        (dict(mean=sd["mean"] * float("inf")), "NaN or infinite"),
    ]:
        with pytest.raises(EmbgeomError, match=match):
            TokenMoments.from_state_dict(dict(sd, **change))
    sd = _filled()[PositionSample].state_dict()
    for change, match in [
        (dict(n_seen=3), "n_seen must be >= 10"), (dict(n_seen=40.0), "n_seen must be an integer"),
        (dict(vectors=sd["vectors"][:, :4]), "vectors has shape"),
        (dict(vectors=sd["vectors"] * float("nan")), "NaN"),
    ]:
        with pytest.raises(EmbgeomError, match=match):
            PositionSample.from_state_dict(dict(sd, **change))


def test_layer_statistics_refusals():
    from test_resilience import _feed, _new_stats, _stream

    sd = _feed(_new_stats(), _stream(np.random.default_rng(0), n_batches=3)).state_dict()
    with pytest.raises(EmbgeomError, match="must hold 3 layers"):
        LayerStatistics.from_state_dict(dict(sd, inliers={"decoder": sd["inliers"]["decoder"][:2]}))
    with pytest.raises(EmbgeomError, match="median_norm"):
        LayerStatistics.from_state_dict(dict(sd, median_norm={"decoder": [-1.0, 1.0, 1.0]}))
    with pytest.raises(EmbgeomError, match="version 3"):
        LayerStatistics.from_state_dict(dict(sd, version=3))
    back = LayerStatistics.from_state_dict(sd, "cpu", type_capacity=10).to("cpu")
    assert back.device == torch.device("cpu")


# ------------------------------------------------------------ 6: failed snapshot writes


@pytest.mark.parametrize("failure, match", [
    (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: file write failed"),
     "file write failed"),
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
])
def test_a_failed_snapshot_write_keeps_the_previous(tmp_path, monkeypatch, failure, match):
    import embgeom.snapshot as snapshot

    snaps = Snapshots(tmp_path, 0, 0, 1, {"config": 1})
    snaps.save({"next_batch": 1, "t": torch.arange(4)})

    def failing(fh, state):
        fh.write(b"half a snapshot" * 100)
        raise failure

    monkeypatch.setattr(snapshot, "write_state", failing)
    with pytest.raises(EmbgeomError) as exc:
        snaps.save({"next_batch": 2, "t": torch.arange(8)})
    msg = str(exc.value)
    assert "\n" not in msg and match in msg and "previous snapshot is intact" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0-of-1.safetensors"]
    monkeypatch.undo()
    back = Snapshots(tmp_path, 0, 0, 1, {"config": 1}).load()
    assert back["next_batch"] == 1 and torch.equal(back["t"], torch.arange(4))


def test_a_failed_snapshot_write_is_one_line_on_the_command_line(tiny_models, small_corpus, tmp_path, capsys,
                                                                monkeypatch):
    import embgeom.snapshot as snapshot

    real, calls = snapshot.write_state, []

    def second_fails(fh, state):
        calls.append(1)
        if len(calls) == 2:
            fh.write(b"x" * 1000)
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
        real(fh, state)

    monkeypatch.setattr(snapshot, "write_state", second_fails)
    out = tmp_path / "out"
    code, err = run_cli(_run_argv(tiny_models["gpt2"], small_corpus, out, "--snapshot-every", "0"), capsys)
    assert code == 2 and "writing the snapshot" in _one_line(err)
    assert [p.name for p in (out / "snapshots").iterdir()] == ["rank0-of-1.safetensors"]
    monkeypatch.undo()
    code, err = run_cli(_run_argv(tiny_models["gpt2"], small_corpus, out, "--resume"), capsys)
    assert code == 0, err


# ------------------------------------------------------------ 4: one run per directory


def _holder(directory):
    """Another process holding the lock on `directory` until killed."""
    code = ("import sys, time; from embgeom._lock import acquire; acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_one_out_is_refused_and_a_dead_holder_is_taken_over(tiny_models, small_corpus, tmp_path,
                                                                              capsys):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        code, err = run_cli(_run_argv(tiny_models["gpt2"], small_corpus, out), capsys)
        assert code == 2
        line = _one_line(err)
        assert f"--out {out} is in use by another embgeom run (pid {holder.pid} on" in line and "-c" in line
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing removed
        from embgeom.results import Result

        with pytest.raises(EmbgeomError, match=f"out {out} is in use"):
            Result(layers=__import__("pandas").DataFrame({"a": [1]})).save(out)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert json.loads((out / ".embgeom.lock").read_text())["pid"] == holder.pid  # a dead holder's lock
    code, err = run_cli(_run_argv(tiny_models["gpt2"], small_corpus, out), capsys)
    assert code == 0, err
    assert (out / "layers.csv").exists()


def test_without_flock_a_dead_pid_is_taken_over_and_a_live_one_holds(tmp_path, monkeypatch):
    import socket

    import embgeom._lock as lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (tmp_path / ".embgeom.lock").write_text(json.dumps({"pid": dead.pid, "host": host}))
    lock.acquire(tmp_path)
    assert json.loads((tmp_path / ".embgeom.lock").read_text())["pid"] == os.getpid()
    lock.release(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for other_host in (host, "another-host"):
            (tmp_path / ".embgeom.lock").write_text(json.dumps({"pid": sleeper.pid, "host": other_host}))
            with pytest.raises(EmbgeomError, match=f"pid {sleeper.pid} on {other_host}"):
                lock.acquire(tmp_path, "out")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    import embgeom._lock as lock

    with lock.locked(tmp_path):
        with lock.locked(tmp_path):
            pass
        assert str(tmp_path.resolve()) in lock._HELD
    assert str(tmp_path.resolve()) not in lock._HELD
    assert (tmp_path / ".embgeom.lock").read_text() == ""
    holder = _holder(tmp_path)  # another process can take it now
    holder.kill()
    holder.wait()

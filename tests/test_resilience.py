"""Scale and resilience: exact state round trips and merges of LayerStatistics,
torchrun sharding equal to one process, SIGKILL + --resume equal to an uninterrupted
run, refusals to resume, --device-map and reduced-precision forward passes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from embgeom import EmbgeomError, analyze
from embgeom.stats.layers import LayerStatistics
from embgeom.models import load_model
from reference import hidden_vectors, two_pass, windows_of

# ---------------------------------------------------------------- LayerStatistics state


def _stream(rng, n_batches=8, B=4, T=40, d=12, L=2):
    for b in range(n_batches):
        h = rng.normal(size=(L + 1, B, T, d)) + 3.0
        h[:, :, 0, :] *= 400.0  # a massive first token in every window
        counted = np.ones((B, T), dtype=bool)
        counted[-1, -5:] = False
        types = rng.zipf(1.5, size=(B, T)) % 50
        windows = np.arange(b * B, (b + 1) * B)[:, None].repeat(T, 1)
        positions = np.arange(T)[None, :].repeat(B, 0)
        yield [torch.from_numpy(x).float() for x in h], counted, types, windows, positions


def _feed(stats, batches, calibrate_after=2, gather=None):
    for i, (hidden, counted, types, windows, positions) in enumerate(batches):
        if i == calibrate_after:
            stats.calibrate(gather)
        w, p = torch.from_numpy(windows), torch.from_numpy(positions)
        meta = {"token_id": torch.from_numpy(types), "window": w, "position": p}
        stats.update("decoder", hidden, torch.from_numpy(counted), torch.from_numpy(types), meta, keys=(w << 20) | p)
    stats.finish(gather)
    return stats


def _new_stats():
    return LayerStatistics({"decoder": 2}, 12, outlier_factor=10.0, id_sample=60, seed=3)


def _assert_same_statistics(a: LayerStatistics, b: LayerStatistics, rel=1e-12):
    for view in ("all", "inliers"):
        for layer in range(3):
            x, y = a.view(view, "decoder", layer), b.view(view, "decoder", layer)
            assert x.moments.n == y.moments.n
            mx, my = x.moments.metrics(), y.moments.metrics()
            for key in mx:
                assert mx[key] == pytest.approx(my[key], rel=rel, abs=1e-12), (view, layer, key)
            tx, ty = x.types.table(), y.types.table()
            assert (tx["token_id"].to_numpy() == ty["token_id"].to_numpy()).all()
            assert (tx["n"].to_numpy() == ty["n"].to_numpy()).all()
            for col in ("Q", "M", "V"):
                np.testing.assert_allclose(tx[col], ty[col], rtol=rel)
    sa, sb = a.samples["decoder"], b.samples["decoder"]
    assert (sa.keys == sb.keys).all()
    np.testing.assert_array_equal(sa.layer(1), sb.layer(1))
    assert a.median_norm == b.median_norm


def test_layer_statistics_state_round_trip_is_exact():
    stats = _feed(_new_stats(), _stream(np.random.default_rng(0)))
    assert sum(a.moments.n for a in stats.outliers["decoder"]) > 0  # the view split is exercised
    back = LayerStatistics.from_state_dict(stats.state_dict())
    _assert_same_statistics(stats, back, rel=0)
    assert len(back.outlier_records()) == len(stats.outlier_records())


def test_layer_statistics_of_two_shards_merge_to_one_pass():
    """Two 'ranks' take alternate batches and calibrate on all calibration norms
    together (the gather a process group would do); their merge equals one pass."""
    batches = list(_stream(np.random.default_rng(1)))
    one = _feed(_new_stats(), batches, calibrate_after=2)

    shards = [_new_stats(), _new_stats()]
    held = {0: [], 1: []}
    # Both shards hold back their part of the first two batches; the gather gives
    # each the other's norms (what Shard.gather_tensors does across processes).
    for i, b in enumerate(batches[:2]):
        held[i % 2].append(b)
    for r in (0, 1):
        for hidden, counted, types, windows, positions in held[r]:
            w, p = torch.from_numpy(windows), torch.from_numpy(positions)
            shards[r].update("decoder", hidden, torch.from_numpy(counted), torch.from_numpy(types),
                             {"token_id": torch.from_numpy(types), "window": w, "position": p}, keys=(w << 20) | p)
    norms = [None, None]

    def local(r):
        p = shards[r]._pending["decoder"]
        return torch.stack([torch.cat([torch.linalg.vector_norm(x[layer].double(), dim=1) for x in p.xs])
                            for layer in range(3)])

    norms = [local(0), local(1)]
    for r in (0, 1):
        shards[r].calibrate(gather=lambda t: norms)
    for i, (hidden, counted, types, windows, positions) in enumerate(batches[2:], start=2):
        s = shards[i % 2]
        w, p = torch.from_numpy(windows), torch.from_numpy(positions)
        s.update("decoder", hidden, torch.from_numpy(counted), torch.from_numpy(types),
                 {"token_id": torch.from_numpy(types), "window": w, "position": p}, keys=(w << 20) | p)
    merged = LayerStatistics.from_state_dict(shards[0].state_dict()).merge(
        LayerStatistics.from_state_dict(shards[1].state_dict()))
    assert merged.calibrated_on == one.calibrated_on
    _assert_same_statistics(one, merged, rel=1e-12)
    assert len(merged.outlier_records()) == len(one.outlier_records())


def test_merge_refuses_different_thresholds():
    a = _feed(_new_stats(), _stream(np.random.default_rng(2)), calibrate_after=1)
    b = _feed(_new_stats(), _stream(np.random.default_rng(3)), calibrate_after=1)
    with pytest.raises(EmbgeomError, match="outlier thresholds"):
        a.merge(b)
    with pytest.raises(EmbgeomError, match="before calibrate"):
        _new_stats().state_dict()


# ---------------------------------------------------------------- command-line runs

RUN_ARGS = ["--seq-len", "32", "--batch-size", "4", "--max-tokens", "12000", "--id-sample", "400",
            "--outlier-factor", "1.15", "--no-progress", "--no-figures"]


def _env():
    env = dict(os.environ)
    # Same thread count in every process, so a batch's forward pass is the same
    # computation whichever process runs it.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(model, corpus, out, *extra, torchrun: int = 0, timeout=300):
    base = [sys.executable, "-m"]
    if torchrun:
        base += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun), "-m"]
    cmd = base + ["embgeom", "run", str(model), "--corpus", str(corpus), "--out", str(out), *RUN_ARGS, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single_run(tiny_models, lee_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    _cli(tiny_models["gpt2"], lee_corpus, out)
    return out


def _assert_same_tables(a, b, rel=1e-9):
    la = pd.read_parquet(a / "layers.parquet").sort_values(["stack", "layer", "view"], ignore_index=True)
    lb = pd.read_parquet(b / "layers.parquet").sort_values(["stack", "layer", "view"], ignore_index=True)
    assert list(la.columns) == list(lb.columns)
    for col in la.columns:
        if pd.api.types.is_float_dtype(la[col]):
            np.testing.assert_allclose(lb[col].to_numpy(), la[col].to_numpy(), rtol=rel, atol=1e-12, err_msg=col)
        else:
            assert la[col].astype(str).tolist() == lb[col].astype(str).tolist(), col
    ta, tb = (pd.read_parquet(d / "tokens.parquet") for d in (a, b))
    keys = ["stack", "layer", "view", "token_id"]
    ta, tb = ta.sort_values(keys, ignore_index=True), tb.sort_values(keys, ignore_index=True)
    assert (ta["n"].to_numpy() == tb["n"].to_numpy()).all()
    for col in ("Q", "M", "V"):
        np.testing.assert_allclose(tb[col].to_numpy(), ta[col].to_numpy(), rtol=rel)
    sa, sb = (pd.read_parquet(d / "spectrum.parquet") for d in (a, b))
    np.testing.assert_allclose(sb["eigenvalue"].to_numpy(), sa["eigenvalue"].to_numpy(), rtol=rel, atol=1e-12)
    ia, ib = (pd.read_parquet(d / "id_scale.parquet") for d in (a, b))  # GRIDE on the same sampled positions
    assert len(ia) == len(ib) > 0
    for col in ("n1", "scale", "id", "id_err"):
        np.testing.assert_allclose(ib[col].to_numpy(), ia[col].to_numpy(), rtol=rel, err_msg=col)
    oa, ob = (pd.read_csv(d / "outliers.csv") for d in (a, b))
    assert len(oa) == len(ob) > 0
    assert (oa[["layer", "window", "position"]].to_numpy() == ob[["layer", "window", "position"]].to_numpy()).all()


def test_two_ranks_equal_one(single_run, tiny_models, lee_corpus, tmp_path):
    out = tmp_path / "two"
    _cli(tiny_models["gpt2"], lee_corpus, out, torchrun=2)
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2
    one = json.loads((single_run / "run.json").read_text())
    assert run["counts"] == one["counts"]
    assert run["outliers"]["median_norm"] == one["outliers"]["median_norm"]
    _assert_same_tables(single_run, out)
    assert not (out / "snapshots").exists()


def test_more_ranks_than_batches(tiny_models, lee_corpus, tmp_path):
    """Four ranks on a corpus of three batches: the rank with none still joins every
    collective, and the result equals one process's."""
    tiny = ["--max-tokens", "300", "--id-sample", "100"]
    _cli(tiny_models["gpt2"], lee_corpus, tmp_path / "one", *tiny)
    _cli(tiny_models["gpt2"], lee_corpus, tmp_path / "four", *tiny, torchrun=4)
    one, four = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "four"))
    assert four["processes"] == 4 and four["counts"] == one["counts"]
    assert -(-one["counts"]["windows"] // 4) < 4  # fewer batches (of 4 windows) than ranks
    la, lb = (pd.read_parquet(tmp_path / d / "layers.parquet") for d in ("one", "four"))
    assert len(la) == len(lb) > 0
    for col in la.columns:
        if pd.api.types.is_float_dtype(la[col]):
            np.testing.assert_allclose(lb[col].to_numpy(), la[col].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=col)


def test_sigkill_then_resume_equals_uninterrupted(single_run, tiny_models, lee_corpus, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "embgeom", "run", str(tiny_models["gpt2"]), "--corpus", str(lee_corpus),
           "--out", str(out), *RUN_ARGS, "--snapshot-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    snap = out / "snapshots" / "rank0-of-1.safetensors"
    deadline = time.monotonic() + 240
    while not snap.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "layers.csv").exists()
    _cli(tiny_models["gpt2"], lee_corpus, out, "--resume")
    run = json.loads((out / "run.json").read_text())
    assert 0 < run["resumed_from_tokens"] < run["counts"]["tokens_counted"]
    _assert_same_tables(single_run, out)
    assert not (out / "snapshots").exists()  # finished: nothing left to resume


def test_resume_refuses_another_configuration(tiny_models, lee_corpus, tmp_path):
    texts = lee_corpus.read_text().splitlines()[:8]
    snaps = tmp_path / "snaps"
    first = analyze(str(tiny_models["gpt2"]), texts, seq_len=32, batch_size=4, device="cpu", id_sample=50,
                    snapshot_dir=snaps, snapshot_every=0)
    assert (snaps / "rank0-of-1.safetensors").exists()
    # Resuming after the last batch adds nothing and reproduces the result exactly.
    again = analyze(str(tiny_models["gpt2"]), texts, seq_len=32, batch_size=4, device="cpu", id_sample=50,
                    snapshot_dir=snaps, resume=True)
    pd.testing.assert_frame_equal(first.layers, again.layers, check_exact=False, rtol=1e-12)
    with pytest.raises(EmbgeomError, match=r"different run \(config.seed: 0 -> 1"):
        analyze(str(tiny_models["gpt2"]), texts, seq_len=32, batch_size=4, device="cpu", id_sample=50, seed=1,
                snapshot_dir=snaps, resume=True)
    with pytest.raises(EmbgeomError, match="different run"):
        analyze(str(tiny_models["gpt2"]), texts[:7], seq_len=32, batch_size=4, device="cpu", id_sample=50,
                snapshot_dir=snaps, resume=True)
    with pytest.raises(EmbgeomError, match="no snapshot"):
        analyze(str(tiny_models["gpt2"]), texts, seq_len=32, device="cpu", snapshot_dir=tmp_path / "none",
                resume=True)


# ---------------------------------------------------------------- big-model options


def test_device_map_auto_gives_the_same_result(tiny_models, lee_corpus):
    texts = lee_corpus.read_text().splitlines()[:6]
    plain = analyze(str(tiny_models["llama"]), texts, seq_len=40, batch_size=3, device="cpu", id_sample=0)
    mapped = analyze(str(tiny_models["llama"]), texts, seq_len=40, batch_size=3, device_map="auto", id_sample=0)
    assert mapped.run["config"]["device_map"] == "auto"
    pd.testing.assert_frame_equal(plain.layers, mapped.layers, check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_forward_is_accumulated_in_float64(tiny_models, lee_corpus, dtype):
    """With one window per batch the forward pass is the reference's own computation,
    so the float64 statistics of the half-precision states match a float64 two-pass
    reference to 1e-9."""
    texts = lee_corpus.read_text().splitlines()[:4]
    res = analyze(str(tiny_models["gpt2"]), texts, seq_len=48, batch_size=1, device="cpu", dtype=dtype,
                  id_sample=0, precision="float64")  # float64 products too (the default's are float32: 1e-5)
    lm = load_model(str(tiny_models["gpt2"]), device="cpu", dtype=dtype)
    windows = windows_of(texts, lm.tokenizer, 48, lm.facts.special_prefix, lm.facts.special_suffix)
    ref = hidden_vectors(lm.model, windows)["main"]
    rows = res.layers[res.layers["view"] == "all"].sort_values("layer")
    assert res.run["model"]["dtype"] == dtype
    for (_, row), X in zip(rows.iterrows(), ref):
        want = two_pass(X)
        assert row["n_tokens"] == want["n_tokens"]
        for key in ("Q", "M", "V", "anisotropy", "mean_cosine"):
            assert row[key] == pytest.approx(want[key], rel=1e-9), (row["layer"], key)


def test_snapshot_refusals_name_the_problem(tmp_path):
    from embgeom.snapshot import Snapshots

    fp = {"config": {"seq_len": 64}, "processes": 2}
    two = Snapshots(tmp_path, 0, rank=0, world=2, fingerprint=fp)
    two.save({"next_batch": 3})
    assert Snapshots(tmp_path, 0, 0, 2, fp).load() == {"next_batch": 3}
    with pytest.raises(EmbgeomError, match="another number of processes"):
        Snapshots(tmp_path, 0, rank=0, world=1, fingerprint=fp).load()
    with pytest.raises(EmbgeomError, match=r"config.seq_len: 64 -> 128"):
        Snapshots(tmp_path, 0, 0, 2, {"config": {"seq_len": 128}, "processes": 2}).load()
    (tmp_path / "rank0-of-2.safetensors").write_bytes(b"\x00 torn write")
    with pytest.raises(EmbgeomError, match="is damaged"):
        Snapshots(tmp_path, 0, 0, 2, fp).load()
    with pytest.raises(EmbgeomError, match="--snapshot-every"):
        Snapshots(tmp_path, -1, 0, 1, fp)


def test_resume_accepts_a_touched_corpus_with_the_same_contents(tiny_models, lee_corpus, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lee_corpus.read_text().splitlines()[:6]) + "\n")
    snaps = tmp_path / "snaps"
    opts = dict(seq_len=32, batch_size=4, device="cpu", id_sample=0, snapshot_dir=snaps)
    first = analyze(str(tiny_models["gpt2"]), str(corpus), snapshot_every=0, **opts)
    os.utime(corpus, (time.time() + 100, time.time() + 100))  # same bytes, new time
    again = analyze(str(tiny_models["gpt2"]), str(corpus), resume=True, **opts)
    pd.testing.assert_frame_equal(first.layers, again.layers, check_exact=False, rtol=1e-12)
    corpus.write_text(corpus.read_text() + "one more line of text\n")
    with pytest.raises(EmbgeomError, match="corpus.sha256"):
        analyze(str(tiny_models["gpt2"]), str(corpus), resume=True, **opts)


# ---------------------------------------------------------------- memory planning


@pytest.mark.parametrize("token_types", ["id", "none"])
def test_planned_accumulator_bytes_are_the_bytes_held(tiny_models, lee_corpus, token_types):
    """The size the pre-pass plans (and checks against free memory) is what the run
    holds at its end, less the outliers' covariances, which a run without outliers
    never allocates (and the outliers' per-type tables, the only unplanned part)."""
    texts = lee_corpus.read_text().splitlines()[:8]
    res = analyze(str(tiny_models["bert"]), texts, seq_len=48, batch_size=3, device="cpu", id_sample=50,
                  outlier_factor=1e6, token_types=token_types)
    assert sum(sum(c) for c in res.run["outliers"]["count"].values()) == 0
    n_types = res.run["counts"]["token_types"]
    assert (n_types is None) == (token_types == "none")
    d, hidden = res.run["model"]["width"], sum(n + 1 for n in res.run["model"]["n_layers"].values())
    covariance = 8 * (d * d + 2 * d)
    per_type = 0 if n_types is None else (8 * d + 16) * (n_types + 1) + 16 * n_types
    # one cross-moment per pair of consecutive layers (its outlier parts never allocated)
    pairs, cross = sum(res.run["model"]["n_layers"].values()), covariance
    assert res.run["accumulator_bytes"] == hidden * (covariance + per_type + 50 * d * 4) + pairs * cross
    assert res.run["planned_accumulator_bytes"] == (res.run["accumulator_bytes"] + hidden * covariance
                                                    + pairs * (cross + 2 * covariance))


def test_memory_check_counts_every_process_on_the_machine(monkeypatch):
    from embgeom import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    parts = {"covariances": (300, "c"), "per-type means": (500, "t")}
    memory.check_accumulators_fit(parts, "cpu")  # 800 <= 0.9 * 1000
    with pytest.raises(EmbgeomError, match=r"\(cpu, 2 processes\)"):
        memory.check_accumulators_fit(parts, "cpu", sharers=2)
    # the parts are listed largest first, and the largest one's fix is named
    with pytest.raises(EmbgeomError, match=r"available: ID sample .* \(s\); covariances .* \(c\)\. "
                                           r"For the ID sample: pass a smaller --id-sample"):
        memory.check_accumulators_fit({"covariances": (300, "c"), "ID sample": (650, "s")}, "cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)  # unknown: no refusal
    memory.check_accumulators_fit({"covariances": (10**15, "c")}, "cpu")


def test_available_host_memory_is_read_and_capped_by_the_cgroup(monkeypatch):
    from embgeom import memory

    avail = memory.available_bytes("cpu")
    if avail is None:
        pytest.skip("no /proc/meminfo here")
    meminfo = [line for line in open("/proc/meminfo") if line.startswith("MemAvailable:")][0]
    assert abs(avail - int(meminfo.split()[1]) * 1024) < 2**30 or memory._cgroup_room() is not None
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 12345)
    assert memory.available_bytes("cpu") == 12345


def test_type_layers_keep_per_type_moments_where_asked_only():
    rng = np.random.default_rng(7)
    batches = list(_stream(rng))
    full = _feed(_new_stats(), batches)
    some = _feed(LayerStatistics({"decoder": 2}, 12, outlier_factor=10.0, id_sample=60, seed=3,
                                 type_layers={"decoder": [2, 0, 2]}), batches)
    assert some.type_layers == {"decoder": (0, 2)}
    for view in ("all", "inliers"):
        assert some.view(view, "decoder", 1).types is None
        for layer in (0, 2):
            pd.testing.assert_frame_equal(full.view(view, "decoder", layer).types.table(),
                                          some.view(view, "decoder", layer).types.table())
        for layer in range(3):
            assert some.view(view, "decoder", layer).moments.metrics() == full.view(view, "decoder", layer).moments.metrics()
    assert full.nbytes - some.nbytes == full.inliers["decoder"][1].types.nbytes + full.outliers["decoder"][1].types.nbytes
    back = LayerStatistics.from_state_dict(some.state_dict())
    assert back.type_layers == some.type_layers
    with pytest.raises(EmbgeomError, match="different type_layers"):
        back.merge(full)
    with pytest.raises(EmbgeomError, match=r"type_layers\['decoder'\] holds 3, not a layer"):
        LayerStatistics({"decoder": 2}, 12, type_layers={"decoder": [3]})


def test_type_layers_in_a_run(tiny_models, lee_corpus):
    """--type-layers 1 -1: per-type columns and tokens.parquet at those layers only,
    equal to a full run's there, and the memory planned (and held) shrinks to match."""
    texts = lee_corpus.read_text().splitlines()[:8]
    opts = dict(seq_len=48, batch_size=3, device="cpu", id_sample=0, outlier_factor=1e6)
    full = analyze(str(tiny_models["bert"]), texts, **opts)
    some = analyze(str(tiny_models["bert"]), texts, type_layers=(1, -1), **opts)
    L = int(full.layers["n_layers"].iloc[0])
    assert set(some.tokens["layer"]) == {1, L}
    typed = some.layers["layer"].isin([1, L])
    type_cols = ["V_within", "V_between", "mv_slope", "mv_pearson", "q_cv", "n_types"]
    assert some.layers.loc[~typed, type_cols].isna().all().all()
    pd.testing.assert_frame_equal(some.layers[typed].reset_index(drop=True),  # n_types: float beside NaN
                                  full.layers[full.layers["layer"].isin([1, L])].reset_index(drop=True),
                                  check_dtype=False)
    pd.testing.assert_frame_equal(some.tokens.reset_index(drop=True),
                                  full.tokens[full.tokens["layer"].isin([1, L])].reset_index(drop=True))
    d, n_types = some.run["model"]["width"], some.run["counts"]["token_types"]
    covariance = 8 * (d * d + 2 * d)
    # the outliers' covariances and the three outlier parts of each cross-layer pair
    # (as in test_planned_accumulator_bytes_are_the_bytes_held): no outlier met
    unallocated = (L + 1) * covariance + L * 3 * covariance
    assert some.run["planned_accumulator_bytes"] == some.run["accumulator_bytes"] + unallocated
    saved = (L + 1 - 2) * ((8 * d + 16) * (n_types + 1) + 16 * n_types)
    assert full.run["accumulator_bytes"] - some.run["accumulator_bytes"] == saved
    with pytest.raises(EmbgeomError, match=r"type_layers=9 is not a layer of this model's encoder \(0 to 2"):
        analyze(str(tiny_models["bert"]), texts, type_layers=(9,), **opts)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_room_counts_the_page_cache_as_free(version, tmp_path, monkeypatch):
    """A container's limit caps the memory available; its page cache (charged to it
    but given back on demand) does not count as used."""
    from embgeom import memory

    limit_name, usage_name, cache_key = memory._CGROUP_FILES[version]
    (tmp_path / limit_name).write_text(f"{8 * 2**30}\n")
    (tmp_path / usage_name).write_text(f"{7 * 2**30}\n")
    (tmp_path / "memory.stat").write_text(f"anon 123\n{cache_key} {5 * 2**30}\nother 9\n")
    monkeypatch.setattr(memory, "_cgroup_dirs", lambda: iter([(version, tmp_path / "gone"), (version, tmp_path)]))
    assert memory._cgroup_room() == 6 * 2**30  # 8 GiB - (7 - 5) GiB
    (tmp_path / limit_name).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    assert memory._cgroup_room() is None

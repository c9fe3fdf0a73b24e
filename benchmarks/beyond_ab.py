"""Cost of issue 17 (cross-layer moments, per-window curvature and prompt entropy) by a direct
A/B in one process (not a test): MiniLM, demo corpus, 20k tokens, seq 128, batch 16, no ID sample.
B = everything; A = cross_layer=False and the per-window metrics switched off; interleaved.
The "windows" and "pairs" fields are the time inside those two parts of B (wrapped calls).

    .venv/bin/python benchmarks/beyond_ab.py [REPEATS] [CORPUS_PATH]
"""
import json, sys, time, statistics
import torch
import embgeom
from embgeom.packaged import minilm_path
from embgeom.wiki import write_demo_corpus
from embgeom.stats import layers as L
from embgeom.stats.cross_moments import CrossMoments
from embgeom.models import load_model

corpus = write_demo_corpus(sys.argv[2] if len(sys.argv) > 2 else "/tmp/embgeom-demo-corpus.txt", max_words=40000)
lm = load_model(str(minilm_path()), device="cpu")
orig = L.LayerStatistics._accumulate_windows
clock = {"windows": 0.0, "pairs": 0.0}
def timed_windows(self, *a):
    t = time.perf_counter(); orig(self, *a); clock["windows"] += time.perf_counter() - t
orig_pair_centred = CrossMoments.update_centred
def timed_pair(self, *a):
    t = time.perf_counter(); r = orig_pair_centred(self, *a); clock["pairs"] += time.perf_counter() - t; return r
CrossMoments.update_centred = timed_pair
def run(full):
    L.LayerStatistics._accumulate_windows = timed_windows if full else (lambda self, *a: None)
    for k in clock: clock[k] = 0.0
    t = time.perf_counter()
    r = embgeom.analyze(lm, str(corpus), max_tokens=20000, seq_len=128, batch_size=16, id_sample=0,
                        cross_layer=full, device="cpu")
    total = time.perf_counter() - t
    return dict(full=full, total=total, stream=r.run["timings_s"]["stream"], metrics=r.run["timings_s"]["metrics"], **clock)
res = []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for full in (False, True):
        res.append(run(full)); print(json.dumps(res[-1]), flush=True)
for full in (False, True):
    s = [r for r in res if r["full"] == full]
    print(full, "stream best", min(r["stream"] for r in s), "median", statistics.median(r["stream"] for r in s),
          "total best", min(r["total"] for r in s), "median", statistics.median(r["total"] for r in s))

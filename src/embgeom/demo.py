"""The embedded default: the packaged encoder and decoder on English Wikipedia text."""
from __future__ import annotations


from ._lock import holding
from .packaged import minilm_path, smollm2_gguf_path

# Paper A cut enwik8 into 512-character chunks (about 110 tokens); 128-token windows
# keep the demo comparable with it.
DEMO_SEQ_LEN = 128
DEMO_WORDS = 40000  # comfortably more than 20k tokens for either tokenizer
# Paper A estimated ID on 4096 token vectors per layer; 5000 sampled positions keeps
# the exact kNN of 31 layers x 2 views within the demo's time.
DEMO_ID_SAMPLE = 5000


@holding("out", "--out")  # one demo per output directory at a time
def run_demo(out, max_tokens: int = 20000, progress: bool = True, say=print, batch_size: int = 16):
    from .output import save_comparison, save_run
    from .pipeline import analyze
    from .results import prepare_out_dir
    from .wiki import write_demo_corpus

    out = prepare_out_dir(out)
    corpus = write_demo_corpus(out / "corpus.txt", max_words=DEMO_WORDS)
    say(f"corpus: {corpus} (English Wikipedia sample shipped with gensim, wiki markup stripped)")
    models = {"minilm": (minilm_path(), "all-MiniLM-L6-v2"), "smollm2": (smollm2_gguf_path(), "SmolLM2-135M")}
    results = []
    for short, (path, name) in models.items():
        say(f"analysing {name} ({path}) on {max_tokens} tokens ...")
        res = analyze(str(path), str(corpus), name=name, max_tokens=max_tokens, seq_len=DEMO_SEQ_LEN,
                      batch_size=batch_size, id_sample=DEMO_ID_SAMPLE, progress=progress)
        save_run(res, out / short)
        results.append(res)
    written, report = save_comparison(results, out, out / "figures")
    say(f"tables: {out / 'minilm' / 'layers.csv'} and {out / 'smollm2' / 'layers.csv'}")
    say(f"figures ({len(written)}): {out / 'figures'} (start with layer_profiles.png); report: {report}")
    return results

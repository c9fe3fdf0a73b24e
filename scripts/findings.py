"""`make findings`: four packaged models on one fixed corpus, then docs/findings.md.

    python scripts/findings.py [--out findings-output] [--docs docs] [--max-tokens 50000] ...

1. writes the corpus (the demo's English Wikipedia sample, a fixed number of words);
2. runs `embgeom run` once per model into OUT/runs/<model>/, and, when this embgeom
   has `--protocol`, once per model and paper protocol into OUT/runs/<model>-<protocol>/.
   A run whose finished tables are there, made with the same options, model and corpus,
   is skipped; an interrupted one continues from its snapshot (`--resume`);
3. renders docs/findings.md from scripts/findings_template.md and the saved tables
   (findings_render.py), and copies the figures it shows to docs/figures/.

Every number in docs/findings.md is read from OUT/runs/*/ by step 3, so
`python scripts/findings.py --render-only` redoes the document from finished runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("paper-a", "paper-b")


@dataclass(frozen=True)
class Model:
    short: str  # folder name under OUT/runs/
    name: str  # the `model` column in docs/findings.md
    locate: str  # function of embgeom.packaged that returns the path


MODELS = (
    Model("minilm", "all-MiniLM-L6-v2", "minilm_path"),
    Model("mpnet", "all-mpnet-base-v2", "mpnet_path"),
    Model("smollm2", "SmolLM2-135M", "smollm2_gguf_path"),
    Model("gemma3", "Gemma-3-270m", "gemma3_gguf_path"),
)


def model_path(model: Model) -> Path:
    from embgeom import packaged

    return Path(getattr(packaged, model.locate)())


# --------------------------------------------------------------------------- what a run is
def run_options(max_tokens: int, seq_len: int, id_sample: int, protocol: str | None = None) -> dict:
    """The options that decide a run's numbers, as run.json's "config" records them
    (batch size and device change only its speed). Paper A's protocol takes its ID
    on the first 4096 tokens (its preset); paper B's has no ID (0: none sampled)."""
    opts = {"max_tokens": max_tokens, "seq_len": seq_len}
    if protocol != "paper-a":
        opts["id_sample"] = 0 if protocol == "paper-b" else id_sample
    if protocol is not None:
        opts["protocol"] = protocol
    return opts


def command(path: Path, corpus: Path, out: Path, options: dict, batch_size: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "embgeom", "run", str(path), "--corpus", str(corpus), "--out", str(out),
           "--batch-size", str(batch_size), "--no-figures"]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd + (["--resume"] if resume else [])


def finished_run(out: Path, path: Path, corpus_sha256: str, options: dict) -> tuple[bool, str]:
    """Whether OUT holds a finished run of the model at `path` on the corpus with that
    SHA-256 and these options; and, if not, why (for the log)."""
    if not (out / "layers.csv").exists():
        return False, "no finished run"
    try:
        run = json.loads((out / "run.json").read_text())
        config, corpus = run["config"], run["corpus"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, "its run.json is missing or unreadable"
    if str(config.get("model")) != str(path):
        return False, f"it analysed another model ({config.get('model')})"
    if corpus.get("sha256") != corpus_sha256:
        return False, "it read another corpus"
    for key, want in options.items():
        if config.get(key) != want:
            return False, f"its {key} was {config.get(key)!r}, not {want!r}"
    return True, "finished earlier with the same options"


def has_snapshot(out: Path) -> bool:
    from embgeom.snapshot import SNAPSHOT_DIR

    return any((out / SNAPSHOT_DIR).glob("rank*-of-*.pt"))


def ensure_run(path: Path, corpus: Path, corpus_sha256: str, out: Path, options: dict, batch_size: int,
               say: Callable[[str], None] = print, execute: Callable[[list[str]], int] | None = None) -> str:
    """Run `embgeom run` unless OUT already holds the same finished run; continue from
    a snapshot where one is left. Returns "skipped", "resumed" or "ran"."""
    execute = execute or (lambda cmd: subprocess.call(cmd))
    done, why = finished_run(out, path, corpus_sha256, options)
    if done:
        say(f"{out}: {why}; skipped")
        return "skipped"
    if has_snapshot(out):
        say(f"{out}: {why}; continuing from its snapshot")
        if execute(command(path, corpus, out, options, batch_size, resume=True)) == 0:
            return "resumed"
        say(f"{out}: the snapshot could not be resumed (see above); starting over")
    else:
        say(f"{out}: {why}; running")
    rc = execute(command(path, corpus, out, options, batch_size, resume=False))
    if rc != 0:
        raise SystemExit(f"findings: `embgeom run` failed for {out} (exit status {rc}); fix it and run again: "
                         "finished runs are kept")
    return "ran"


def protocol_supported() -> bool:
    """Whether this embgeom's `run` has --protocol (added by a later version)."""
    out = subprocess.run([sys.executable, "-m", "embgeom", "run", "--help"], capture_output=True, text=True)
    return "--protocol" in out.stdout


# --------------------------------------------------------------------------- the whole
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "findings-output")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="where findings.md and figures/ are written")
    p.add_argument("--models", default=",".join(m.short for m in MODELS), help="comma-separated subset")
    p.add_argument("--max-tokens", type=int, default=50000, help="counted tokens per model")
    p.add_argument("--id-sample", type=int, default=10000, help="sampled positions for intrinsic dimension")
    p.add_argument("--protocol-tokens", type=int, default=20000, help="counted tokens per protocol run (0: none)")
    p.add_argument("--seq-len", type=int, default=128, help="window length (paper A: 512-character chunks)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--words", type=int, default=100000, help="words of the Wikipedia sample in the corpus")
    p.add_argument("--render-only", action="store_true", help="only rebuild findings.md from finished runs")
    return p.parse_args(argv)


def write_corpus(out: Path, words: int) -> Path:
    from embgeom.wiki import write_demo_corpus

    path = out / f"corpus-{words}w.txt"
    if not path.exists():  # deterministic: written once, read by every run
        write_demo_corpus(path, max_words=words)
    return path


def main(argv=None) -> None:
    from embgeom.packaged import sha256_of

    args = parse(argv)
    chosen = [m for m in MODELS if m.short in args.models.split(",")]
    if not chosen:
        raise SystemExit(f"findings: --models names none of {', '.join(m.short for m in MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(args.out, args.words)
    sha = sha256_of(corpus)
    runs = args.out / "runs"
    plan = []  # (model, protocol or None, folder)
    for m in chosen:
        plan.append((m, None, runs / m.short, run_options(args.max_tokens, args.seq_len, args.id_sample)))
    protocols = args.protocol_tokens > 0 and protocol_supported()
    if args.protocol_tokens > 0 and not protocols:
        print("findings: this embgeom's `run` has no --protocol option; the paper-protocol runs are skipped "
              "(findings.md says so)", file=sys.stderr)
    if protocols:
        for m in chosen:
            for proto in PROTOCOLS:
                plan.append((m, proto, runs / f"{m.short}-{proto}",
                             run_options(args.protocol_tokens, args.seq_len, args.id_sample, proto)))
    if not args.render_only:
        for i, (m, proto, folder, options) in enumerate(plan, 1):
            t0 = time.perf_counter()
            print(f"findings [{i}/{len(plan)}] {m.name}" + (f" --protocol {proto}" if proto else ""), file=sys.stderr)
            status = ensure_run(model_path(m), corpus, sha, folder, options, args.batch_size,
                                say=lambda msg: print(f"  {msg}", file=sys.stderr))
            if status != "skipped":
                print(f"  {status} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    from findings_render import render

    written = render([(m.name, folder, proto) for m, proto, folder, _ in plan], args.out, args.docs,
                     ROOT / "scripts" / "findings_template.md", protocols_run=protocols)
    print(f"findings: wrote {written}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

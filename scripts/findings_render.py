"""docs/findings.md from finished runs: every number is read from the saved tables.

The template (scripts/findings_template.md) holds the prose; `{{key}}` placeholders are
filled from `values()`, and `{{layer:MODEL:VIEW:METRIC:LAYER}}` reads one cell of a
model's layers.csv. An unknown placeholder is an error, never left in the text.
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pandas as pd

from embgeom.claims import CLAIMS, NO, RULES, claims_table
from embgeom.results import Result

PROTOCOL_CLAIMS = {"paper-a": ("A1", "A2"), "paper-b": ("B1", "B2", "B3", "B4")}
NEW_COLUMNS = {"linear_cka": "linear CKA with the previous layer", "linearity": "linearity with the previous layer",
               "curvature": "curvature (rad)", "prompt_entropy": "prompt entropy (nats)"}
CLAIM_FIGURES = {"A1": "anisotropy_id.png", "A2": "anisotropy_id.png", "B1": "tradeoff_depth.png",
                 "B2": "within_share.png", "B3": "profile_M.png", "B4": "profile_q_cv.png"}
_PLACEHOLDER = re.compile(r"\{\{([^{}]+)\}\}")


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int,)) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e7):
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def load(name: str, folder: Path) -> Result:
    """A finished run with its `model` column set to `name` in every table."""
    if not (folder / "layers.csv").exists():
        raise SystemExit(f"findings: {folder} holds no finished run; run `make findings` (without --render-only)")
    res = Result.load(folder)
    for table in (res.layers, res.spectrum, res.tokens, res.outliers, getattr(res, "id_scale", None)):
        if table is not None and "model" in table.columns:
            table["model"] = name
    if getattr(res, "id_scale", None) is None and (folder / "id_scale.parquet").exists():
        res.id_scale = pd.read_parquet(folder / "id_scale.parquet").assign(model=name)
    return res


def tag(model: str, stack: str) -> str:
    from embgeom._names import slug

    return slug(model, "", stack)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections
def models_table(runs: dict) -> str:
    rows = []
    for name, res in runs.items():
        r, f = res.run, res.run.get("model", {})
        counts, t = r.get("counts", {}), r.get("timings_s", {})
        n = counts.get("tokens_counted")
        id_n = pd.to_numeric(res.layers["id_n"], errors="coerce").max()
        rows.append([name, f.get("kind"), f.get("norm_placement"), sum((f.get("n_layers") or {}).values()),
                     f.get("width"), f"{f.get('n_parameters', 0) / 1e6:.0f}M", fmt(n), fmt(counts.get("windows")),
                     fmt(float(id_n)), fmt(t.get("total"), 3), fmt(n / t["stream"] if n and t.get("stream") else None)])
    return md_table(["model", "kind", "norm", "blocks", "width", "parameters", "tokens", "windows", "ID points",
                     "run time (s)", "tokens/s streamed"], rows)


def facts_of(runs: dict) -> dict:
    return {name: res.run.get("model", {}) for name, res in runs.items()}


def by_claim(table: pd.DataFrame) -> str:
    """The claims table ordered by claim (then model), each claim's text once."""
    out = []
    for claim, g in table.groupby("claim", sort=False):
        out.append(f"**{claim}: {CLAIMS[claim]}.** Rule: {RULES[claim]}\n")
        out.append(md_table(["model", "all tokens", "inliers"],
                            [[r.model, f"**{r.mark_all}** {r.numbers_all}", f"**{r.mark_inliers}** {r.numbers_inliers}"]
                             for r in g.itertuples(index=False)]))
        out.append("")
    return "\n".join(out)


def outlier_rows(runs: dict, table: pd.DataFrame) -> tuple[str, dict]:
    rows, values = [], {}
    for name, res in runs.items():
        lay = res.layers
        n_all = lay[lay["view"] == "all"].set_index("layer")["n_tokens"].astype(float)
        n_in = lay[lay["view"] == "inliers"].set_index("layer")["n_tokens"].astype(float)
        share = (1 - n_in / n_all).fillna(0.0)
        o = res.outliers if res.outliers is not None else pd.DataFrame(columns=["layer", "position", "token"])
        affected = share[share > 0]
        changed = table[(table["model"] == name) & (table["mark_all"] != table["mark_inliers"])]["claim"].tolist()
        pos0 = float((o["position"] == 0).mean()) if len(o) else float("nan")
        top_pos = ", ".join(f"{int(p)} ({c})" for p, c in o["position"].value_counts().head(3).items()) or "–"
        top_tok = ", ".join(f"`{t}` ({c})" for t, c in o["token"].astype(str).value_counts().head(3).items()) or "–"
        span = f"{int(affected.index.min())}–{int(affected.index.max())}" if len(affected) else "none"
        ratio = pd.to_numeric(o.get("norm_over_median"), errors="coerce").median() if len(o) else float("nan")
        rows.append([name, span, f"{share.max():.2%} (layer {int(share.idxmax())})" if share.max() > 0 else "0",
                     f"{pos0:.0%}" if len(o) else "–", top_pos, top_tok, fmt(float(ratio)), ", ".join(changed) or "none"])
        values[f"{name}.outlier_max_share"] = f"{share.max():.2%}"
        values[f"{name}.outlier_layers"] = span
        values[f"{name}.outlier_position0"] = f"{pos0:.0%}" if len(o) else "–"
        values[f"{name}.claims_changed"] = ", ".join(changed) or "none"
    header = ["model", "layers with outliers", "largest share of tokens", "share of outliers at position 0",
              "most frequent positions (outlier rows)", "most frequent tokens", "median norm / layer median",
              "claims whose mark changes without them"]
    return md_table(header, rows), values


def norm_contrast(runs: dict, table: pd.DataFrame) -> str:
    """Post-LN against pre-LN and sandwich norms, one row per model, read off the tables."""
    rows = []
    for name, res in runs.items():
        lay = res.layers[res.layers["layer"] >= 1]
        view = {v: g.set_index("layer") for v, g in lay.groupby("view")}
        allv, inl = view.get("all"), view.get("inliers")
        q = pd.to_numeric(allv["Q"], errors="coerce")
        share = 1 - inl["n_tokens"].astype(float) / allv["n_tokens"].astype(float) if inl is not None else None
        b1 = table[(table["model"] == name) & (table["claim"] == "B1")]
        rows.append([name, res.run.get("model", {}).get("norm_placement"),
                     f"{fmt(float(q.iloc[0]))} → {fmt(float(q.max()))} (max, layer {int(q.idxmax())})",
                     fmt(float(pd.to_numeric(allv["q_cv"], errors="coerce").median())),
                     f"{fmt(float(allv['anisotropy'].max()))} / "
                     + (fmt(float(inl["anisotropy"].max())) if inl is not None else "–"),
                     f"{float(share.max()):.2%}" if share is not None else "–",
                     f"{b1['mark_all'].iloc[0]} / {b1['mark_inliers'].iloc[0]}" if len(b1) else "–"])
    return md_table(["model", "norm", "Q over the blocks: first → max", "median CV of Q across types",
                     "max anisotropy, all / inliers", "largest outlier share", "B1 mark, all / inliers"], rows)


def contradictions(table: pd.DataFrame, runs: dict, drawn: set) -> str:
    lines = []
    for r in table.itertuples(index=False):
        views = [v for v, m in (("all tokens", r.mark_all), ("inliers", r.mark_inliers)) if m == NO]
        if not views:
            continue
        nums = r.numbers_all if r.mark_all == NO else r.numbers_inliers
        fig = CLAIM_FIGURES[r.claim]
        if r.claim == "B1":
            stack = next(iter(runs[r.model].run.get("model", {}).get("n_layers", {"": 0})))
            if f"mv_scatter_{tag(r.model, stack)}.png" in drawn:
                fig = f"mv_scatter_{tag(r.model, stack)}.png"
        lines.append(f"- **{r.model} contradicts {r.claim}**, \"{CLAIMS[r.claim]}\", in the "
                     f"{' and '.join(views)} view{'s' if len(views) > 1 else ''}: {nums}. "
                     f"See [figures/{fig}](figures/{fig}).")
    return "\n".join(lines) or "No model contradicts a claim outright (no ✘ in either view)."


def new_measures(runs: dict) -> str:
    cols = [c for c in NEW_COLUMNS if any(c in r.layers.columns and pd.to_numeric(r.layers[c], errors="coerce").notna().any()
                                          for r in runs.values())]
    parts = []
    if cols:
        rows = []
        for name, res in runs.items():
            for view, g in res.layers.groupby("view"):
                g = g[g["layer"] >= 1].set_index("layer")
                cells = []
                for c in cols:
                    s = pd.to_numeric(g[c], errors="coerce").dropna() if c in g.columns else pd.Series(dtype=float)
                    cells.append(f"{fmt(s.min())} (layer {int(s.idxmin())}) – {fmt(s.max())}, median {fmt(s.median())}"
                                 if len(s) else "–")
                rows.append([name, view] + cells)
        parts.append(md_table(["model", "view"] + [f"{NEW_COLUMNS[c]}: min (layer) – max, median" for c in cols], rows))
        parts.append("\n" + " ".join(f"![{c}](figures/profile_{c}.png)" for c in cols))
    else:
        parts.append("Layer-to-layer linear CKA and linearity, curvature and prompt entropy: not in this run "
                     "(this embgeom writes none of those columns).")
    parts.append("")
    parts.append(plateaus(runs))
    return "\n".join(parts)


def plateaus(runs: dict) -> str:
    try:
        from embgeom import gride_plateau
    except ImportError:
        gride_plateau = None
    tables = {n: r.id_scale for n, r in runs.items() if getattr(r, "id_scale", None) is not None and len(r.id_scale)}
    if gride_plateau is None or not tables:
        return "ID across scales (GRIDE plateau): not in this run (no id_scale.parquet)."
    rows = []
    for name, t in tables.items():
        lay = runs[name].layers
        for (view, layer), g in t.groupby(["view", "layer"]):
            if layer not in (1, int(lay["n_layers"].iloc[0]) // 2, int(lay["n_layers"].iloc[0])):
                continue
            p = gride_plateau(g)
            twonn = lay[(lay["view"] == view) & (lay["layer"] == layer)]["id_twonn"]
            rows.append([name, view, int(layer), f"{fmt(p['n1_low'])}–{fmt(p['n1_high'])}",
                         f"{fmt(p['scale_low'])}–{fmt(p['scale_high'])}", fmt(p["id"]),
                         fmt(float(twonn.iloc[0])) if len(twonn) else "–"])
    return ("ID across scales: where each curve is flattest (`embgeom.gride_plateau`), at the first block, the "
            "middle layer and the last layer:\n\n"
            + md_table(["model", "view", "layer", "n1 range", "scale range", "plateau ID", "TwoNN"], rows))


def protocol_section(main: dict, protocol_runs: dict, ran: bool) -> str:
    if not ran:
        return ("The papers' own protocols: not in this run (this embgeom's `run` has no `--protocol`, or "
                "`--protocol-tokens 0` was given).")
    rows = []
    for (name, proto), res in protocol_runs.items():
        facts = {name: res.run.get("model", {})}
        theirs = claims_table(res.layers, facts).set_index("claim")
        ours = claims_table(main[name].layers, facts).set_index("claim")
        n = res.run.get("counts", {}).get("tokens_counted")
        for c in PROTOCOL_CLAIMS[proto]:
            rows.append([c, name, f"**{ours.loc[c, 'mark_all']}** {ours.loc[c, 'numbers_all']}",
                         f"{proto} ({fmt(n)} tokens): **{theirs.loc[c, 'mark_all']}** {theirs.loc[c, 'numbers_all']}"])
    return md_table(["claim", "model", "embgeom's defaults (all tokens)", "the paper's protocol (all tokens)"], rows)


# --------------------------------------------------------------------------- the document
def fill(template: str, values: dict, runs: dict) -> str:
    def one(m):
        key = m.group(1).strip()
        if key.startswith("layer:"):
            _, model, view, metric, layer = key.split(":")
            lay = runs[model].layers
            cell = lay[(lay["view"] == view) & (lay["layer"] == int(layer))][metric]
            if len(cell) != 1:
                raise SystemExit(f"findings: the template asks for {key}, which the tables do not hold")
            return fmt(float(cell.iloc[0]))
        if key not in values:
            raise SystemExit(f"findings: the template has an unknown placeholder {{{{{key}}}}}")
        return str(values[key])

    return _PLACEHOLDER.sub(one, template)


def render(plan: list, out: Path, docs: Path, template: Path, protocols_run: bool) -> Path:
    """plan: (model name, run folder, protocol or None). Writes docs/findings.md and
    copies the figures it shows into docs/figures/; returns the document's path."""
    from embgeom.plots import plot_runs

    main = {name: load(name, folder) for name, folder, proto in plan if proto is None}
    figdir = out / "figures"
    drawn = {p.name for p in plot_runs(list(main.values()), figdir)}
    proto_runs = {(name, proto): load(name, folder) for name, folder, proto in plan if proto is not None}
    layers = pd.concat([r.layers for r in main.values()], ignore_index=True)
    table = claims_table(layers, facts_of(main))
    outliers, values = outlier_rows(main, table)
    first = next(iter(main.values())).run
    values.update({
        "models_table": models_table(main), "claims_by_claim": by_claim(table), "outliers_table": outliers,
        "contradictions": contradictions(table, main, drawn), "norm_contrast": norm_contrast(main, table), "new_measures": new_measures(main),
        "protocols": protocol_section(main, proto_runs, protocols_run),
        "max_tokens": fmt(first["config"]["max_tokens"]), "seq_len": fmt(first["config"]["seq_len"]),
        "id_sample": fmt(first["config"]["id_sample"]), "outlier_factor": fmt(first["config"]["outlier_factor"]),
        "corpus_file": Path(first["corpus"]["path"]).name, "corpus_sha256": first["corpus"]["sha256"][:12],
        "model_figures": "\n".join(
            " ".join(f"![{n} {what}](figures/{f})" for what, f in (("shares", f"shares_{tag(n, s)}.png"),
                                                                    ("M-V", f"mv_scatter_{tag(n, s)}.png"))
                     if f in drawn)
            for n, r in main.items() for s in r.run.get("model", {}).get("n_layers", {})),
        "outlier_figures": " ".join(
            f"![{n} outliers](figures/outliers_{tag(n, s)}.png)" for n, r in main.items()
            for s in r.run.get("model", {}).get("n_layers", {}) if f"outliers_{tag(n, s)}.png" in drawn),
    })
    for r in table.itertuples(index=False):
        for view in ("all", "inliers"):
            values[f"{r.model}.{r.claim}.{view}"] = f"{getattr(r, 'mark_' + view)} ({getattr(r, 'numbers_' + view)})"
    text = fill(template.read_text(), values, main)
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    for name in sorted(set(re.findall(r"\(figures/([^)\s]+\.png)\)", text))):
        if not (figdir / name).exists():
            raise SystemExit(f"findings: docs/findings.md shows figures/{name}, which was not drawn")
        shutil.copyfile(figdir / name, docs / "figures" / name)
    target = docs / "findings.md"
    target.write_text(text)
    return target

"""Protocols: named sets of options that reproduce how each paper computed its numbers.

A protocol is only a preset: it sets a few options of `AnalysisConfig`, each of which
stays an option of its own, and an option given explicitly beside a protocol wins.

- ``embgeom`` (the default): intrinsic dimension on a uniform random sample of
  positions (``--id-sample``), TwoNN keeping 90% of the ratios (Facco et al.), points
  whose nearest neighbour is at distance 0 dropped before ranking; token types by
  vocabulary id; Q, M, V, V_within, V_between over every counted token.
- ``paper-a`` (Razzhigaev et al., EACL 2024 Findings; their LLM-Microscope
  ``intrinsic_dimension``): TwoNN on the first 4096 counted tokens of each layer,
  keeping 20% of the ratios, points with μ = r₂/r₁ ≤ 1 + 10⁻⁸ (duplicates, ties)
  left out of the fit but keeping their ranks in the empirical distribution.
- ``paper-b`` (Yamagiwa & Shimodaira, COLING 2025; their Norm-and-Variance scripts):
  token types are surface strings with ``##`` / ``Ġ`` / ``▁`` stripped, and the
  layer-level Q, M, V, V_within, V_between are taken over the tokens of the types with
  min_count ≤ n_t ≤ max_count only (the types the M–V fit uses).
"""
from __future__ import annotations

# The options a protocol sets, with embgeom's own values.
DEFAULTS = {
    "id_first": 0,
    "twonn_discard": 0.1,
    "twonn_duplicates": "drop",
    "token_types": "id",
    "types_filtered": False,
}

PROTOCOLS = {
    "embgeom": dict(DEFAULTS),
    "paper-a": dict(DEFAULTS, id_first=4096, twonn_discard=0.8, twonn_duplicates="keep-rank"),
    "paper-b": dict(DEFAULTS, token_types="string", types_filtered=True),
}

SOURCES = {
    "embgeom": "embgeom's defaults",
    "paper-a": "Razzhigaev et al. (paper A)",
    "paper-b": "Yamagiwa & Shimodaira (paper B)",
}


def preset(name: str) -> dict:
    """The options protocol `name` sets; EmbgeomError for an unknown name."""
    if name not in PROTOCOLS:
        from .errors import EmbgeomError, option

        raise EmbgeomError(f"{option('protocol')} must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    return dict(PROTOCOLS[name])


def resolve(options: dict) -> dict:
    """`options` with the protocol's settings filled in where not given explicitly
    (an explicit option, even one equal to a default, overrides the preset)."""
    name = options.get("protocol", "embgeom")
    return {**preset(name), **options, "protocol": name}


def record(config: dict) -> dict:
    """run.json's ``protocol`` entry: its name, what the preset sets, and the options
    given explicitly that differ from it."""
    name = config.get("protocol", "embgeom")
    sets = PROTOCOLS.get(name, {})
    overridden = {k: config[k] for k in sets if k in config and config[k] != sets[k]}
    return {"name": name, "preset": dict(sets), "overridden": overridden}


def _settings(cfg: dict) -> list[str]:
    """The protocol settings of `cfg` that differ from embgeom's, in words."""
    out = []
    first = cfg.get("id_first") or 0
    if first:
        out.append(f"ID on the first {first:,} counted tokens of each layer "
                   f"(embgeom: {cfg.get('id_sample', 10000):,} random positions)")
    discard = cfg.get("twonn_discard", DEFAULTS["twonn_discard"])
    if discard != DEFAULTS["twonn_discard"]:
        out.append(f"TwoNN keeping {100 * (1 - discard):.3g}% of the ratios (embgeom: 90%)")
    if cfg.get("twonn_duplicates", "drop") != "drop":
        out.append("points with μ ≤ 1 + 1e-8 left out of the TwoNN fit but ranked (embgeom: only r₁ = 0 "
                   "dropped, before ranking)")
    if cfg.get("token_types", "id") != "id":
        out.append(f"token types `{cfg.get('token_types')}` (embgeom: vocabulary id)")
    if cfg.get("types_filtered"):
        out.append(f"Q, M, V, V_within, V_between over the tokens of the types with "
                   f"{cfg.get('min_count', 10)} ≤ n_t ≤ {cfg.get('max_count', 100000)} only (embgeom: every token)")
    return out


def describe(cfg: dict) -> str:
    """One line saying which protocol a run's numbers follow and how they differ from
    the other protocols (`cfg`: run.json's ``config``)."""
    name = cfg.get("protocol", "embgeom")
    diffs = _settings(cfg)
    changed = record(cfg)["overridden"]
    note = f" (options given beside it: {', '.join(f'{k}={v!r}' for k, v in changed.items())})" if changed else ""
    if not diffs:
        return (f"Protocol **{name}**{note}: {SOURCES.get(name, name)}: ID on random positions, 90% of the TwoNN "
                "ratios kept, Q/M/V over every token, types by id; `--protocol paper-a` or `paper-b` gives each "
                "paper's own choices instead (see README).")
    how = "with" if name == "embgeom" else f"as {SOURCES.get(name, name)} computed them:"
    return (f"Protocol **{name}**{note}, {how} " + "; ".join(diffs)
            + ". Every other number as under `--protocol embgeom`.")

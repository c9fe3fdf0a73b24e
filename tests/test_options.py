"""Options declared once: every AnalysisConfig option is an option of `embgeom run`
with the flag, default and help its field declares, and every analysis option of
`embgeom run` is an AnalysisConfig field."""
from __future__ import annotations

import typer

from embgeom.cli import _analysis_options, app
from embgeom.options import AnalysisConfig, flag, option_docs, options

# `embgeom run`'s options that are not analysis options.
NOT_ANALYSIS = {"models", "corpus", "out", "revision", "step", "cache_dir", "snapshot_every", "resume", "figures",
                "progress"}


def run_command():
    group = typer.main.get_command(app)
    return group.commands["run"]


def test_every_field_is_an_option_of_run_with_its_help_and_vice_versa():
    params = {p.name: p for p in run_command().params}
    declared = {f.name: f for f in options()}
    assert set(params) - NOT_ANALYSIS == set(declared)
    assert set(declared) <= set(AnalysisConfig.__dataclass_fields__)
    for name, f in declared.items():
        p = params[name]
        assert p.help == f.metadata["help"] and p.help.strip()
        on, _, off = flag(f).partition("/")
        assert p.opts == [on] and p.secondary_opts == ([off] if off else [])
        if f.metadata["repeat"]:
            assert p.multiple and p.default in ([], (), None)
        elif f.metadata["preset"]:  # None on the command line: --protocol fills it
            assert p.default is None
        else:
            assert p.default == f.default
    # The listed flags are the ones of the command line before options were declared once.
    assert {flag(f) for f in options()} >= {"--token-types", "--types-filtered/--all-types", "--type-layers",
                                            "--exclude-positions", "--cross-layer/--no-cross-layer", "--precision",
                                            "--protocol", "--id-first", "--twonn-discard", "--twonn-duplicates"}


def parsed(*args):
    ctx = run_command().make_context("run", ["m", "--corpus", "c.txt", "--out", "o", *args])
    return _analysis_options({k: v for k, v in ctx.params.items() if k not in NOT_ANALYSIS})


def test_command_line_values_become_analyze_options():
    presets = {f.name for f in options() if f.metadata["preset"]}
    assert presets == {"token_types", "id_first", "twonn_discard", "twonn_duplicates", "types_filtered"}
    default = parsed()
    assert default == {f.name: f.default for f in options() if f.name not in presets}
    assert default["type_layers"] is None and default["exclude_positions"] == ()
    cfg = AnalysisConfig.from_options(**parsed("--protocol", "paper-b"))
    assert cfg.token_types == "string" and cfg.types_filtered is True
    given = parsed("--type-layers", "-1", "--type-layers", "0", "--exclude-positions", "0", "--all-types",
                   "--no-cross-layer", "--precision", "float64", "--token-types", "none", "--id-first", "7",
                   "--no-window-measures", "--gride-max-rank", "0")
    assert given["type_layers"] == (-1, 0) and given["exclude_positions"] == (0,)
    assert given["types_filtered"] is False and given["cross_layer"] is False and given["precision"] == "float64"
    assert given["token_types"] == "none" and given["id_first"] == 7 and given["window_measures"] is False
    assert given["gride_max_rank"] == 0 and default["gride_max_rank"] == 64


def test_docstrings_list_every_option_with_its_help():
    from embgeom.pipeline import analyze

    docs = " ".join(option_docs().split())
    for f in options():
        assert f"{f.name} : default {f.default!r} (command line: {flag(f)})" in docs
        assert " ".join(f.metadata["help"].split()) in docs
    assert option_docs() in AnalysisConfig.__doc__ and option_docs() in analyze.__doc__

"""Every public name of `embgeom` has a docstring that says what it computes, with
its parameters and a short example, and the examples run: each is a doctest whose
printed output is checked here."""
from __future__ import annotations

import doctest
import inspect
import re

import pytest

import embgeom

PUBLIC = list(embgeom.__all__)
# Methods from a paper carry the reference (authors and year) in the docstring.
WITH_REFERENCE = ["anisotropy", "curvature", "gride", "gride_plateau", "linear_cka", "linearity", "mle_id",
                  "prompt_entropy", "twonn", "twonn_ml", "Moments", "TokenMoments", "AnalysisConfig"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# Examples that load the packaged MiniLM (its weights, or only its tokenizer).
WITH_MODEL = {"analyze", "Result", "save_run", "GeometryProbe", "GeometryCallback"}


def examples(name):
    """The doctests of the object's own docstring (not its methods'), run with empty
    globals: each example imports what it uses, as a reader would."""
    obj = getattr(embgeom, name)
    return doctest.DocTestFinder(recurse=False).find(obj, name, globs={})


def parameters(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.name != "self"
            and p.kind not in (p.VAR_POSITIONAL,)]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring_with_its_parameters_and_an_example(name):
    obj = getattr(embgeom, name)
    doc = inspect.getdoc(obj) or ""
    assert len(doc.split()) >= 20, f"embgeom.{name}: the docstring should say what it computes"
    assert sum(e.examples.__len__() for e in examples(name)) >= 2, f"embgeom.{name}: no >>> example"
    if name != "EmbgeomError":  # the exception's arguments are its message
        missing = [p for p in parameters(obj) if not re.search(rf"\b{re.escape(p)}\b", doc)]
        assert not missing, f"embgeom.{name}: parameters not documented: {missing}"
    if name in WITH_REFERENCE:
        assert re.search(r"\((19|20)\d\d\)|\b(19|20)\d\d\b", doc), f"embgeom.{name}: no reference (authors, year)"


def test_the_checks_see_a_missing_example_and_parameter():
    def bare(x, k=2):
        """Something about x, with enough words to pass the length check of this test
        but no example and no mention of the other argument."""

    tests = doctest.DocTestFinder(recurse=False).find(bare, "bare", globs={})
    assert sum(len(t.examples) for t in tests) == 0
    assert parameters(bare) == ["x", "k"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in WITH_MODEL else n for n in PUBLIC])
def test_docstring_examples_run(name):
    report = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in examples(name):
        result = runner.run(test, out=report.append)
        assert result.failed == 0, "".join(report)

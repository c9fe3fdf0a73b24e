"""Data flows one way through the package: each module imports only modules on its
own floor or below, and no import circle exists.

The imports are read from the source with `ast` (nothing is imported), every
`import` and `from ... import` anywhere in a module, inside functions included,
relative imports resolved. Imports by name through `importlib.import_module` (the
package's lazy public names in `embgeom/__init__.py`) are not edges.

The floors, bottom first (a module may import from its floor and the floors below):

 0 base        small shared helpers: the error type, input validation, atomic
               writes, names and slugs, progress bars, heap trimming
 1 metrics     plain arrays in, numbers out
 2 stats       streaming accumulators (they call metrics on their state)
 3 model       corpus, windows, model loading, forward passes, memory planning,
               distributed sharding, snapshots, packaged models, the demo corpus
 4 tables      results.py: the Result tables, their files; no drawing, no report
 5 pipeline    analyze: corpus x model -> accumulators -> metrics -> Result
 6 figures     report.md and the figures, read off the tables
 7 output      save_run: tables, then figures, then report.md
 8 callers     sweeps, the training probe and callback, the demo
 9 cli         the command line
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "embgeom"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# (floor name, modules): a module is named without the package prefix; "x.*" is
# every module of the subpackage x, its __init__ included. "" is embgeom/__init__.py,
# which holds only the version and the lazy public names.
FLOORS = [
    ("base", ["", "errors", "_validate", "_atomic", "_names", "progress", "_heap", "_lock", "_statefile", "_numba",
              "_hardware", "protocols", "options"]),
    ("metrics", ["metrics.*"]),
    ("stats", ["stats.*"]),
    ("model", ["corpus", "corpus_columns", "windows", "models", "model_facts", "model_gguf", "extract", "memory",
               "distributed", "snapshot", "packaged", "wiki", "wikitext", "_wikitext_templates"]),
    ("tables", ["results"]),
    ("pipeline", ["pipeline.*"]),
    ("figures", ["report", "report_beyond", "plots", "plots_beyond", "plots_training", "_png", "_profiles",
                 "claims"]),
    ("output", ["output"]),
    ("callers", ["sweep", "sweep_targets", "probe", "callback", "demo"]),
    ("cli", ["cli", "__main__"]),
]



def module_name(path: Path) -> str:
    """'stats.layers' for src/embgeom/stats/layers.py, 'stats' for its __init__, ''
    for the package's own __init__."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def resolve(importer: str, is_package: bool, node: ast.AST, modules) -> list[str]:
    """The package modules `node` (an Import or ImportFrom in `importer`) loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return [n[len(PACKAGE) + 1:] if n != PACKAGE else "" for n in names
                if n == PACKAGE or n.startswith(PACKAGE + ".")]
    if node.level:
        here = importer.split(".") if importer else []
        if not is_package:
            here = here[:-1]  # a module's relative imports start from its package
        if node.level > 1:
            here = here[: len(here) - (node.level - 1)]
        base = ".".join(here + ([node.module] if node.module else []))
    elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
        base = node.module[len(PACKAGE) + 1:] if node.module != PACKAGE else ""
    else:
        return []
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        found.append(sub if sub in modules else base)  # `from . import x`: the module x if there is one
    return found


def import_edges() -> set[tuple[str, str]]:
    modules = package_modules()
    edges = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, path.name == "__init__.py", node, modules):
                    if target != name:
                        edges.add((name, target))
    return edges


def floor_of(module: str) -> int | None:
    for i, (_, members) in enumerate(FLOORS):
        for m in members:
            if m == module or (m.endswith(".*") and (module == m[:-2] or module.startswith(m[:-1]))):
                return i
    return None


def circles(edges) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_reader_sees_every_kind_of_import():
    """The reader resolves absolute, relative (one and two dots, from a package's
    __init__) and function-level imports; a test that would pass on an empty graph
    proves nothing."""
    modules = {"", "results", "stats", "stats.moments", "stats._kernels", "metrics.spectrum", "plots"}
    code = ("import embgeom.results\nfrom embgeom import plots\nfrom . import _kernels\n"
            "def f():\n    from ..metrics.spectrum import eigenvalues\n    from .. import __version__\n")
    tree = ast.parse(code)
    got = [resolve("stats.moments", False, n, modules) for n in ast.walk(tree)
           if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert sorted(sum(got, [])) == sorted(["results", "plots", "stats._kernels", "metrics.spectrum", ""])
    assert resolve("stats", True, ast.parse("from .moments import Moments").body[0], modules) == ["stats.moments"]
    edges = import_edges()
    assert ("results", "errors") in edges and ("pipeline", "results") in edges
    assert ("stats._layer_id", "metrics.neighbors") in edges  # imported inside a function
    assert circles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]


def test_every_module_has_a_floor():
    missing = sorted(m or "__init__" for m in package_modules() if floor_of(m) is None)
    assert not missing, f"place these modules on a floor in FLOORS (tests/test_architecture.py): {missing}"


def test_no_import_against_the_floors():
    against = []
    for a, b in sorted(import_edges()):
        fa, fb = floor_of(a), floor_of(b)
        if fa is not None and fb is not None and fb > fa:
            against.append(f"{a or '__init__'} ({FLOORS[fa][0]}) imports {b} ({FLOORS[fb][0]})")
    assert not against, "imports against the floor order:\n" + "\n".join(against)


def test_no_import_circle():
    found = circles(import_edges())
    assert not found, f"import circles: {found}"


# The longest a function or method in src/embgeom may be: its `def` line to its last
# line, docstring and comments included.
MAX_FUNCTION_LINES = 80
# Known exceptions, 'module.qualified.name' -> its length today: one listed here may
# shrink but not grow. None today.
LONG_FUNCTIONS: dict[str, int] = {}


def function_lengths() -> dict[str, int]:
    """'module.qualified.name' -> lines from `def` to the last line, for every function
    and method of the package (nested ones included)."""
    lengths = {}
    for module, path in package_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                name = prefix
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}" if prefix else child.name
                    if not isinstance(child, ast.ClassDef):
                        lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, name)

        visit(tree, module)
    return lengths


def test_the_length_reader_counts_def_to_last_line():
    lengths = function_lengths()
    assert lengths["pipeline.analyze"] > 40  # docstring and body counted
    assert "results.Result.save" in lengths and "stats.moments.Moments.update" in lengths


def test_no_function_over_80_lines():
    lengths = function_lengths()
    long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES and LONG_FUNCTIONS.get(name, 0) < n}
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (def to last line, docstring included); split "
                      f"them into helpers: {sorted(long.items())}")
    stale = sorted(name for name in LONG_FUNCTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES)
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines: drop them from LONG_FUNCTIONS: {stale}"

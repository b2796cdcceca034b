"""Imports go one way: no cycle in soup's import graph, and no import from a lower stage into a higher one.

The graph is read from the source (``ast``): every ``import`` and ``from ... import``, at module level
or inside functions, counts; only ``if TYPE_CHECKING:`` blocks do not (they never run). Stages, low to
high, follow the data flow: recipe -> ingredients -> plan -> engine (a merge method per tensor) ->
sink -> finish -> publish, with choosing (soups), workers, running and scheduling on top.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (stage, module globs): a module may import modules of its own stage or lower ones only; the first
# matching glob names a module's stage
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("soup.errors", "soup.locks", "soup.signals", "soup.progress", "soup.options", "soup.cook_options", "soup.plugins", "soup.safeyaml")),
    ("io", ("soup.hub.specs", "soup.hub.errors", "soup.hub.download", "soup.io.checkpoint", "soup.io.manifest",
            "soup.io.modelfiles", "soup.io.components", "soup.io.ingredients", "soup.io.jsonshape", "soup.io.evidence",
            "soup.io.safetensors_header", "soup.io.vocab", "soup.io.vocab_files")),
    ("methods", ("soup.methods", "soup.methods.*")),
    ("engine", ("soup.engine", "soup.engine.*")),
    ("parts", ("soup.adapters", "soup.adapters.lora", "soup.adapters.pairs", "soup.adapters.peft_io",
               "soup.hub.precheck", "soup.io", "soup.io.inspection")),
    ("finish", ("soup.finish", "soup.finish.*")),
    ("merge", ("soup.merging", "soup.adapters.merging", "soup.hub", "soup.hub.*")),
    ("choose", ("soup.soups", "soup.soups.*", "soup.evaluators", "soup.evaluators.*", "soup.adapters.candidates")),
    ("recipe", ("soup.registry", "soup.registry.*", "soup.recipe")),
    ("workers", ("soup.workers", "soup.workers.*")),
    ("cook", ("soup.pipeline", "soup.preflight")),
    ("run", ("soup.schedule", "soup.schedule.changes", "soup.run")),
    ("schedule", ("soup.schedule.*",)),
    ("front", ("soup.demo", "soup.demo.*", "soup.cli", "soup.cli.*", "soup")),
]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``evaluators/`` ships as ``soup.evaluators``)."""
    found = {}
    for top, prefix in (("soup", []), ("evaluators", ["soup", "evaluators"])):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            parts = (prefix or ["soup"]) + parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The soup modules ``name`` imports (a ``from pkg import mod`` counts as ``pkg.mod``)."""
    is_pkg = path.name == "__init__.py"
    deps: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            deps.add(target)

    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in known else mod)
    return deps


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan, iterative enough for a graph of ~100 nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in g.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def stage_of(module: str) -> int:
    for rank, (_, globs) in enumerate(STAGES):
        if any(fnmatchcase(module, pattern) for pattern in globs):
            return rank
    raise AssertionError(f"{module}: no stage in tests/test_imports.py STAGES; add it where it belongs")


def upward(g: dict[str, set[str]]) -> list[str]:
    """Imports from a lower stage into a higher one, as ``a (stage) -> b (stage)`` lines."""
    bad = []
    for a, deps in sorted(g.items()):
        for b in sorted(deps):
            if stage_of(b) > stage_of(a):
                bad.append(f"{a} ({STAGES[stage_of(a)][0]}) -> {b} ({STAGES[stage_of(b)][0]})")
    return bad


def test_the_import_graph_has_no_cycle():
    g = graph()
    assert len(g) > 60 and "soup.merging" in g["soup.soups.scorer"]  # the graph is really read
    assert cycles(g) == []


def test_imports_go_from_higher_stages_to_lower_ones():
    assert upward(graph()) == []


def test_every_module_has_a_stage_and_a_docstring():
    for name, path in modules().items():
        stage_of(name)
        if path.name != "__init__.py" or path.read_text().strip():
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path}: no module docstring"


def test_the_checks_see_a_cycle_hidden_in_a_function(tmp_path):
    """The checker itself: a cycle through an import inside a function, and an upward import, are found."""
    pkg = tmp_path / "soup"
    pkg.mkdir()
    (pkg / "a.py").write_text("import soup.b\n")
    (pkg / "b.py").write_text("def f():\n    from soup import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import soup.a\n")
    known = {"soup", "soup.a", "soup.b", "soup.c"}
    g = {f"soup.{m}": imports_of(f"soup.{m}", pkg / f"{m}.py", known) for m in "abc"}
    assert g["soup.b"] == {"soup.a"} and g["soup.c"] == set()
    assert cycles(g) == [["soup.a", "soup.b"]]
    assert upward({"soup.engine.plan": {"soup.pipeline"}}) == ["soup.engine.plan (engine) -> soup.pipeline (cook)"]


@pytest.mark.parametrize("limit", [420])
def test_modules_stay_readable_in_one_sitting(limit):
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > limit}
    assert long == {}

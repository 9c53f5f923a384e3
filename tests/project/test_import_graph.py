"""The import graph of grasp_jax/ and experiments/ is a tree (no cycles), and the core
imports nothing of models, data or the runner.

Every import counts: at module level, inside functions, and under
``TYPE_CHECKING``. A lazy or type-only import hides a cycle from Python at run
time, not from a reader, and it is what lets one grow unnoticed. An import of
``a.b.c`` counts as an edge to ``a.b.c`` only: the packages above it run
first, but a package's ``__init__`` importing its own submodules is how a
package is made, not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("grasp_jax", "experiments")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a ``from ... import`` reads from, relative levels resolved."""
    if not node.level:
        return node.module or ""
    anchor = module.split(".")
    if not is_package:
        anchor = anchor[:-1]
    anchor = anchor[:len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imported_modules(path: Path, module: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the file imports, anywhere in it.

    ``from a import b`` imports ``a.b`` when that is a module, else ``a``; a
    dotted name that is not a module (``import a.b.f``) counts as its nearest
    module above.
    """
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.add(sub if sub in modules else base)
    out = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    modules = project_modules()
    return {m: imported_modules(path, m, set(modules)) for m, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [m0, m1, ..., m0], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_type_checking_imports(tmp_path):
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from experiments.configs import Config\n"
              "def f():\n    from grasp_jax import data\n    import experiments.methods\n")
    path = tmp_path / "m.py"
    path.write_text(source)
    modules = {"experiments.configs", "grasp_jax", "grasp_jax.data", "experiments.methods",
               "experiments.m"}
    assert imported_modules(path, "experiments.m", modules) == {
        "experiments.configs", "grasp_jax.data", "experiments.methods"}


def test_the_graph_resolves_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from . import sibling\nfrom ..other import f\n")
    modules = {"grasp_jax.data.sibling", "grasp_jax.other", "grasp_jax.data"}
    assert imported_modules(path, "grasp_jax.data.m", modules) == {
        "grasp_jax.data.sibling", "grasp_jax.other"}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "experiments.methods" in graph and "grasp_jax.data.registry" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("forbidden", ["grasp_jax.models", "grasp_jax.data", "experiments"])
def test_the_core_imports_nothing_of_models_data_or_the_runner(forbidden):
    graph = import_graph()
    core = [m for m in graph if m == "grasp_jax" or (
        m.startswith("grasp_jax.") and m.split(".")[1] not in ("models", "data"))]
    assert "grasp_jax.scoring" in core
    bad = {m: sorted(t for t in graph[m] if t == forbidden or t.startswith(forbidden + "."))
           for m in core}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"the core imports {forbidden}: {bad}"


def _defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments), and
    the modules it imports whole (``import jax``: a test may patch ``steps.jax``), not the
    names it imports from other modules."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def runner_names_read_from_elsewhere() -> list[str]:
    """``file:line module.name`` for every runner name read from a module that does not
    define it (a re-export), by ``from experiments.m import name`` or ``m.name`` after
    ``from experiments import m``, anywhere in the project's Python files."""
    runner = {m: p for m, p in project_modules().items()
              if m.startswith("experiments.") and p.name != "__init__.py"}
    defined = {m: _defined_names(p) for m, p in runner.items()}
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        if ".venv" in path.parts or not {"experiments", "benchmarks", "examples", "tests"} & {
                path.relative_to(ROOT).parts[0]}:
            continue
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> runner module
        reads: list[tuple[int, str, str]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in runner:
                        aliases[alias.asname or alias.name] = sub
                    elif node.module in runner:
                        reads.append((node.lineno, node.module, alias.name))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                reads.append((node.lineno, aliases[node.value.id], node.attr))
        where = path.relative_to(ROOT)
        out += [f"{where}:{line} {module}.{name}" for line, module, name in reads
                if name not in defined[module] and not hasattr(__builtins__, name)]
    return out


def test_every_runner_name_is_read_from_the_module_that_defines_it():
    # The runner is no public API: a name has one home, and importers name it.
    found = runner_names_read_from_elsewhere()
    assert not found, "read from a module that only imports them:\n" + "\n".join(found)

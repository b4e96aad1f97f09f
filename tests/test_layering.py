"""The layering: ``core`` is the lower package, ``train`` and ``infer`` are apps on top that never import each other,
and no package has an import cycle between its own modules.

Every import is walked with ``ast`` (function-level ones too, which is where cycles used to hide).
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"core": {"train", "infer", "benchmarks"}, "train": {"infer", "benchmarks"},
             "infer": {"train", "benchmarks"}}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import statement in a file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {(a.name.split(".")[0], node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.module.split(".")[0], node.lineno))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layers(package):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in sorted((ROOT / package).rglob("*.py"))
           for name, line in sorted(imported_packages(path)) if name in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_walker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from infer.tune import x\n    import train.run as r\n")
    assert {n for n, _ in imported_packages(f)} == {"os", "infer", "train"}


ERROR_TYPES = {"InputError", "ConfigError", "TrainingError"}


def test_error_types_are_imported_from_core_errors_only():
    """One home for the error types: never through a module that happens to import them (core.io, core.config)."""
    bad = []
    for path in sorted(p for d in (*FORBIDDEN, "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "core.errors":
                names = sorted(ERROR_TYPES & {a.name for a in node.names})
                if names:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(names)} from {node.module}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------- import cycles


PACKAGES = ("core", "train", "infer", "benchmarks")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph(package_dir: Path) -> dict[str, dict[str, str]]:
    """module -> {imported module of the same package: "file:line" of the first such import}, every import counted
    (function-level ones too). Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``: edges to those."""
    root = package_dir.parent
    files = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, dict[str, str]] = {m: {} for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # ``from a import b``: b is a submodule or a name in a
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in files and name != mod:
                        graph[mod].setdefault(name, f"{path.relative_to(root)}:{node.lineno}")
    return graph


def import_circles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (modules that import each other), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(graph: dict[str, dict[str, str]], component: list[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first inside the component)."""
    start, inside = component[0], set(component)
    came_from: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path: list[str] = [start]
                node: str | None = v
                while node is not None:
                    path.append(node)
                    node = came_from[node]
                return path[::-1]
            if w in inside and w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"{component} is not strongly connected")


def describe(component: list[str], graph: dict[str, dict[str, str]]) -> str:
    cycle = shortest_cycle(graph, component)
    return (f"{', '.join(component)} import each other, e.g. " + " -> ".join(cycle)
            + "  (" + ", ".join(graph[a][b] for a, b in pairwise(cycle)) + ")")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    graph = module_graph(ROOT / package)
    circles = import_circles(graph)
    assert not circles, "import cycles:\n" + "\n".join(describe(c, graph) for c in circles)


def test_the_cycle_detector_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.sub.c import g\n")  # function-level: still counted
    (pkg / "sub" / "c.py").write_text("from .. import a\n")  # relative, back to pkg.a
    (pkg / "d.py").write_text("import pkg.a\n")  # imports into the cycle, not part of it
    graph = module_graph(pkg)
    assert import_circles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
    assert describe(["pkg.a", "pkg.sub.b", "pkg.sub.c"], graph) == (
        "pkg.a, pkg.sub.b, pkg.sub.c import each other, e.g. pkg.a -> pkg.sub.b -> pkg.sub.c -> pkg.a  "
        "(pkg/a.py:2, pkg/sub/b.py:2, pkg/sub/c.py:1)")
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert import_circles(module_graph(pkg)) == []

"""The layering: ``core`` is the lower package, ``train`` and ``infer`` are apps on top that never import each other.

Every import is walked with ``ast`` (function-level ones too, which is where cycles used to hide).
"""

from __future__ import annotations

import ast
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

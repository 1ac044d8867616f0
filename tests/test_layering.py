"""Imports go downward only: astra -> kernel -> ipc, sandbox; ipc and sandbox import nothing
of Astra (STYLE.md section 1)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALLOWED = {
    "ipc": set(),
    "sandbox": set(),
    "kernel": {"ipc", "sandbox"},
    "astra": {"kernel", "ipc", "sandbox"},
}


def _imported_packages(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_downward(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = _imported_packages(path) - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"

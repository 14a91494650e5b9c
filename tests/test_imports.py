"""Imports go one way, and every entry module imports on its own.

The layer contracts themselves are import-linter's (``[tool.importlinter]`` in
pyproject.toml, run by ``make test`` as ``lint-imports``); these tests check what a
contract cannot say: methods do not import each other, function-level imports of adaptc
modules are only the lazy ones at the CLI and package boundary (each with a comment
saying why), and no import cycle hides behind the order the other tests import in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

from adaptc.methods import NAMES

PACKAGE = Path(__file__).resolve().parents[1] / "adaptc"
# where a module may import adaptc lazily, inside a function: the CLI (commands import
# torch only when they run) and the package root (`import adaptc` stays light)
LAZY_ALLOWED = ("adaptc/cli/", "adaptc/__init__.py")

MODULES = [
    "adaptc",
    "adaptc.spec",
    "adaptc.layers",
    "adaptc.plan",
    "adaptc.compiler",
    "adaptc.adapters",
    "adaptc.io",
    "adaptc.api",
    "adaptc.peft",
    "adaptc.cli",
    *(f"adaptc.methods.{name}.spec" for name in NAMES),
    *(f"adaptc.methods.{name}.method" for name in NAMES),
]


def test_methods_do_not_import_each_other():
    graph = grimp.build_graph("adaptc")
    for name in NAMES:
        package = f"adaptc.methods.{name}"
        for module in graph.find_descendants(package) | {package}:
            for imported in graph.find_modules_directly_imported_by(module):
                parts = imported.split(".")
                other = parts[2] if parts[:2] == ["adaptc", "methods"] and len(parts) > 2 else None
                assert other in (None, name, "base", "registry", "common"), (
                    f"{module} imports {imported}"
                )


def test_function_level_imports_are_lazy_boundary_imports_with_a_reason():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("adaptc"):
                    allowed = rel.startswith(LAZY_ALLOWED) and _says_why(lines, inner.lineno)
                    if not allowed:
                        found.append(f"{rel}:{inner.lineno}: from {inner.module} import …")
                elif isinstance(inner, ast.Import) and any(
                    a.name.startswith("adaptc") for a in inner.names
                ):
                    found.append(f"{rel}:{inner.lineno}: import …")
    assert not found, "function-level imports of adaptc outside the boundary:\n" + "\n".join(found)


def _says_why(lines: list[str], lineno: int) -> bool:
    """A comment on the import, or on the block of imports it belongs to (or just above)."""
    i = lineno - 1
    while i >= 0 and (
        lines[i].lstrip().startswith(("from ", "import ", ")", "#")) or "(" in lines[i]
    ):
        if "#" in lines[i]:
            return True
        i -= 1
        if i >= 0 and not lines[i].strip():
            break
    return i >= 0 and lines[i].lstrip().startswith("#")


def test_each_entry_module_imports_in_a_fresh_interpreter():
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in MODULES
    }
    failed = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = err.strip().splitlines()[-1]
    assert not failed, failed

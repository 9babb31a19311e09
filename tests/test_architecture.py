"""The layering of docs/architecture.md, checked: the import-linter contract in pyproject.toml
(no package imports a layer above it or a sibling beside it, function-level imports included),
every function-level import of tensorparity outside the CLI says why it is lazy, and no two
modules share a basename."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tensorparity"


def test_the_layer_contract_holds() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if inside and isinstance(child, ast.ImportFrom) and (child.module or "").startswith("tensorparity"):
                found.append((child.lineno, child.module or ""))
            if inside and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if a.name.startswith("tensorparity"))
            visit(child, inside or is_function)

    visit(tree, False)
    return found


def test_function_level_imports_outside_the_cli_say_why_they_are_lazy() -> None:
    # The CLI imports the library inside each command so that `tensorparity --help` costs no torch;
    # elsewhere a function-level import hides a dependency from a reader, so each one names its reason.
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if {"cli", "examples"} & set(path.relative_to(PACKAGE).parts[:-1]):
            continue
        lines = path.read_text().splitlines()
        for lineno, module in _function_level_imports(path):
            statement = "\n".join(lines[lineno - 1: lineno + 3])
            if "# lazy:" not in statement:
                unexplained.append(f"{path.relative_to(ROOT)}:{lineno} imports {module}")
    assert not unexplained, "\n".join(unexplained)


def test_no_two_modules_share_a_basename() -> None:
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert [n for n, count in names.items() if count > 1] == []


def test_the_lazy_check_sees_a_function_level_import(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from tensorparity.errors import UsageError\n    return UsageError\n")
    assert _function_level_imports(sample) == [(2, "tensorparity.errors")]

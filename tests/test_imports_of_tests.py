"""No module imports a test module: shared test code lives in tests/support/ and e2e/harness/,
and product code imports no test code at all (the contracts in pyproject.toml cover e2e/,
bench/ and fuzz/; `tests` is not a package import-linter can see)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("controller", "crds", "reconcilers")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def is_test_module(name: str) -> bool:
    parts = name.lstrip(".").split(".")
    return any(part.startswith("test_") or part == "lab_tests" for part in parts)


def python_files(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def test_no_module_imports_a_test_module() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in python_files("tests", "e2e", "bench", "fuzz", *PRODUCT)
        for name in imported_modules(path)
        if is_test_module(name)
    ]
    assert offenders == []


def test_product_code_imports_no_test_support() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in python_files(*PRODUCT)
        for name in imported_modules(path)
        if name == "tests" or name.startswith("tests.")
    ]
    assert offenders == []


def test_the_check_sees_a_test_import() -> None:
    assert is_test_module("tests.test_store") and is_test_module("e2e.test_agent")
    assert is_test_module(".test_cli") and is_test_module("e2e.lab_tests.test_lvm_lab")
    assert not is_test_module("tests.support.cli") and not is_test_module("e2e.harness.etcd")

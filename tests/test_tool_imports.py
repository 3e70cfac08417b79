"""No file in tools/ imports the test suite.

Tools (benchmarks, the peer-suite runner, the example) run on their own; what they share with the tests — the
sensitivity models, the peer-suite harness — lives in tools/, and tests import it from there, never the reverse.
Each tool is parsed with :mod:`ast` (nothing is executed) and refused when it

- imports ``tests`` or a module below it (``import tests.x``, ``from tests.x import y``, ``importlib.import_module``
  of such a name), or
- imports a module by a name that only a file under tests/ provides (``import peer_cases`` after putting a tests
  folder on the path), or
- puts a folder under tests/ on ``sys.path``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
TOOLS = ROOT / "tools"


def _test_only_module_names() -> frozenset[str]:
    """Names a bare ``import NAME`` could only resolve to inside tests/ (not the root, not tools/)."""
    names = {path.stem for path in TESTS.rglob("*.py")} | {path.name for path in TESTS.rglob("*") if path.is_dir()}
    elsewhere = {path.stem for path in ROOT.glob("*.py")} | {path.name for path in ROOT.iterdir() if path.is_dir()}
    elsewhere |= {path.stem for path in TOOLS.glob("*.py")}
    return frozenset(names - elsewhere - {"__init__", "__pycache__"})


def _mentions_tests(node: ast.AST) -> bool:
    return any(
        isinstance(inner, ast.Constant) and isinstance(inner.value, str)
        and (inner.value == "tests" or inner.value.startswith(("tests/", "tests.")))
        for inner in ast.walk(node)
    )


def _is_sys_path_edit(call: ast.Call) -> bool:
    function = call.func
    return (
        isinstance(function, ast.Attribute) and function.attr in ("insert", "append", "extend")
        and isinstance(function.value, ast.Attribute) and function.value.attr == "path"
        and isinstance(function.value.value, ast.Name) and function.value.value.id == "sys"
    )


def _is_import_module(call: ast.Call) -> bool:
    function = call.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    return name in ("import_module", "__import__")


def reaches_into_tests(source: str, test_only: frozenset[str]) -> list[str]:
    """Every import or path edit in ``source`` that reaches into tests/, as ``line: description``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Call) and _is_sys_path_edit(node) and _mentions_tests(node):
            found.append(f"{node.lineno}: sys.path gets a folder under tests/")
        elif isinstance(node, ast.Call) and _is_import_module(node) and _mentions_tests(node):
            found.append(f"{node.lineno}: imports a tests module dynamically")
        for module in modules:
            top = module.split(".")[0]
            if top == "tests" or top in test_only:
                found.append(f"{node.lineno}: imports {module}")
    return found


def test_no_tool_imports_the_tests():
    test_only = _test_only_module_names()
    tools = sorted(TOOLS.rglob("*.py"))
    assert tools, "tools/ holds no Python files"
    offences = {
        path.relative_to(ROOT).as_posix(): found
        for path in tools
        if (found := reaches_into_tests(path.read_text(encoding="utf-8"), test_only))
    }
    assert not offences, f"tools import the tests: {offences}"


def test_the_check_catches_every_way_in():
    test_only = frozenset({"peer_cases"})
    caught = [
        "from tests.ptq.small_models import residual_cnn",
        "import tests.ptq.small_models",
        "import peer_cases",
        "import sys\nsys.path.insert(0, str(ROOT / 'tests' / 'peer'))",
        "import importlib\nimportlib.import_module('tests.peer.peer_cases')",
    ]
    for source in caught:
        assert reaches_into_tests(source, test_only), source
    allowed = "import sys\nsys.path.insert(0, str(ROOT))\nfrom tools import peer_cases\nfrom qgraph.models import vit"
    assert reaches_into_tests(allowed, test_only) == []


def test_the_shared_modules_are_only_test_names_when_under_tests():
    test_only = _test_only_module_names()
    assert "small_models" in test_only and "qdq_builders" in test_only
    assert "peer_cases" not in test_only and "sensitivity_models" not in test_only  # they live in tools/ now

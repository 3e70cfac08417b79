"""The tree is lint-clean (ruff, as configured in pyproject.toml) and the IR and data-model layers type-check (mypy).

Both tools are development dependencies (the ``dev`` extra); the README's test command installs them, so these run
wherever the suite runs.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_is_clean_on_the_ir_and_the_data_model() -> None:
    result = _run("mypy", "--no-incremental", "qgraph/ir", "qgraph/quant")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

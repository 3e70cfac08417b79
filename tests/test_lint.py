"""The tree is lint-clean (ruff, as configured in pyproject.toml) and the IR and data-model layers type-check (mypy).

Both tools are development dependencies (the ``dev`` extra), which the README's test command installs; the
latest-runtime environment of ``tools/check_latest_runtime.py`` has the test tools alone and skips these.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(command[0]) is None:
        # the second environment of tools/check_latest_runtime.py installs the test tools alone; the dev one lints
        pytest.skip(f"{command[0]} is not installed here (the dev extra brings it; the training environment runs it)")
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_is_clean_on_the_ir_and_the_data_model() -> None:
    result = _run("mypy", "--no-incremental", "qgraph/ir", "qgraph/quant")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

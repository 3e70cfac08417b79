"""Tests that need onnxruntime-training carry the ``qat`` marker, and skip, with the reason and what to install,
where the installed onnxruntime has no training API (the ``onnxruntime`` wheel of the ``cpu`` extra).

Every test under ``tests/qat/`` and ``tests/train/`` needs it and is marked here; a test elsewhere that trains says
so itself with ``@pytest.mark.qat``. ``pytest -m "not qat"`` runs the rest, as ``tools/check_latest_runtime.py``
does in its second environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qgraph.runtime import training_unavailable_reason

TESTS = Path(__file__).resolve().parent
#: Folders whose every test fine-tunes through onnxruntime-training.
TRAINING_FOLDERS = ("qat", "train")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = training_unavailable_reason()
    for item in items:
        relative = item.path.resolve().relative_to(TESTS) if item.path.resolve().is_relative_to(TESTS) else None
        if relative is not None and relative.parts[0] in TRAINING_FOLDERS:
            item.add_marker(pytest.mark.qat)
        if reason is not None and item.get_closest_marker("qat") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))

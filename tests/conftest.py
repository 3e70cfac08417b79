"""Test-wide setup.

Tests that need onnxruntime-training carry the ``qat`` marker, and skip, with the reason and what to install,
where the installed onnxruntime has no training API (the ``onnxruntime`` wheel of the ``cpu`` extra).

Every test under ``tests/qat/`` and ``tests/train/`` needs it and is marked here; a test elsewhere that trains says
so itself with ``@pytest.mark.qat``. ``pytest -m "not qat"`` runs the rest, as ``tools/check_latest_runtime.py``
does in its second environment.

The peer suite (``tests/peer/``) reads the ONNX node test cases that the onnx wheel installs; recent onnx wheels
(1.23.2) ship none, and there it is skipped with that reason. Its baseline is classified against the training
environment's onnx and onnxruntime, which run it.

The speed choice (:mod:`qgraph.speed_choice`, on by default in :class:`qgraph.ptq.QuantizeOptions`) times the
candidate integer models on this machine and writes the fastest, so what a default run writes depends on the load
of the machine: a test of the quantizer's structure would see a lone stem convolution or a tiny MatMul kept FP32 on
one run and not on the next. Tests therefore get the target's plain lowering, as with ``--no-speed-choice``, unless
they are marked ``speed_choice`` (the tests of the speed choice as qgraph runs it).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from qgraph import runtime
from qgraph.ir import versions
from qgraph.runtime import training_unavailable_reason
from tools.peer_cases import node_cases_folder

TESTS = Path(__file__).resolve().parent
#: Folders whose every test fine-tunes through onnxruntime-training.
TRAINING_FOLDERS = ("qat", "train")
PEER_FOLDER = "peer"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = training_unavailable_reason()
    peer_cases = node_cases_folder()
    no_peer_cases = None if peer_cases.is_dir() else pytest.mark.skip(
        reason=f"onnx {onnx.__version__} installs no node test cases ({peer_cases} is missing); the training "
               "environment runs the peer suite")
    for item in items:
        path = item.path.resolve()
        folder = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None
        if folder in TRAINING_FOLDERS:
            item.add_marker(pytest.mark.qat)
        if reason is not None and item.get_closest_marker("qat") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
        if folder == PEER_FOLDER and no_peer_cases is not None:
            item.add_marker(no_peer_cases)


@pytest.fixture()
def fresh_runtime_caches():
    """The installed runtime and its versions are looked up once per process; a test that fakes them starts and
    ends with empty caches."""
    runtime.installed_onnxruntime.cache_clear()
    versions.supported_versions.cache_clear()
    yield
    runtime.installed_onnxruntime.cache_clear()
    versions.supported_versions.cache_clear()


@pytest.fixture(autouse=True)
def _plain_lowering_unless_marked(request, monkeypatch):
    if request.node.get_closest_marker("speed_choice") is not None:
        return
    from qgraph import pipeline, ptq

    def never(options, target) -> bool:
        return False

    monkeypatch.setattr(ptq, "speed_choice_applies", never)
    monkeypatch.setattr(pipeline, "speed_choice_applies", never)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs the command line in-process (CliRunner) sets the root logger's level and handler, as the
    command should in its own process; the next test starts from the logging it found."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for handler in [handler for handler in root.handlers if handler not in handlers]:
        root.removeHandler(handler)
    for handler in handlers:  # the ones the command replaced
        if handler not in root.handlers:
            root.addHandler(handler)

"""The table of what each onnxruntime release runs, and the installed release's row checked against the runtime itself
(the probe of ``tests/ir/runtime_probe.py``): the suite runs in the training environment (onnxruntime 1.19.2) and in
``tools/check_latest_runtime.py``'s (the latest release), so both ends of the table are measured on every CI run."""

from __future__ import annotations

import itertools

import onnx
import pytest

from qgraph import runtime
from qgraph.errors import UnsupportedRuntimeError
from qgraph.ir import supported_versions, versions
from tests.ir.runtime_probe import failure


def test_the_table_starts_at_the_oldest_supported_release_and_rises():
    rows = versions.RUNTIME_LIMITS
    assert rows[0].release == runtime.MINIMUM_ONNXRUNTIME == (1, 19)
    assert [row.release for row in rows] == sorted({row.release for row in rows})
    for earlier, later in itertools.pairwise(rows):
        assert (later.ir_version, later.opset) >= (earlier.ir_version, earlier.opset)
        assert (later.ir_version, later.opset) != (earlier.ir_version, earlier.opset)


@pytest.mark.parametrize(
    ("release", "ir_version", "opset"),
    [((1, 19), 10, 21), ((1, 20), 10, 21), ((1, 21), 10, 22), ((1, 22), 10, 22), ((1, 23), 11, 22),
     ((1, 24), 13, 25), ((1, 25), 13, 26), ((1, 31), 13, 26), ((1, 32), 14, 27), ((1, 40), 14, 27), ((2, 0), 14, 27)],
)
def test_each_release_gets_the_row_measured_for_it(release, ir_version, opset):
    row = versions.limits_of_release(release)
    assert (row.ir_version, row.opset) == (ir_version, opset)


def test_a_release_older_than_the_table_has_no_row():
    with pytest.raises(ValueError, match="1.18"):
        versions.limits_of_release((1, 18))


def test_supported_versions_are_the_installed_row_within_the_installed_onnx():
    supported = supported_versions()
    installed = runtime.installed_onnxruntime()
    row = versions.limits_of_release(installed.release)
    assert supported.onnxruntime_version == installed.version
    assert supported.ir_version == min(row.ir_version, onnx.IR_VERSION)
    assert supported.opset == min(row.opset, onnx.defs.onnx_opset_version())


def test_an_older_onnx_caps_what_a_newer_runtime_runs(monkeypatch, fresh_runtime_caches):
    monkeypatch.setattr(runtime.ort, "__version__", "1.32.0")
    monkeypatch.setattr(onnx, "IR_VERSION", 10)
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 22)
    supported = supported_versions()
    assert (supported.ir_version, supported.opset) == (10, 22)
    assert supported.describe() == "onnxruntime 1.32.0 (IR <= 10, opset <= 22)"


def test_the_installed_runtime_runs_its_row_and_not_beyond():
    """The probe model loads and runs at the row's IR version and opset; one IR version more is refused, and so is
    one opset more (the row is the runtime's own limit, not onnx's)."""
    row = versions.limits_of_release(runtime.installed_onnxruntime().release)
    assert failure(row.opset, row.ir_version) is None
    assert failure(13, row.ir_version + 1) is not None
    assert failure(row.opset + 1, row.ir_version) is not None


def test_an_onnxruntime_older_than_supported_is_refused_naming_the_version_found(monkeypatch, fresh_runtime_caches):
    monkeypatch.setattr(runtime.ort, "__version__", "1.17.3")
    with pytest.raises(UnsupportedRuntimeError, match=r"^onnxruntime 1\.17\.3 is installed, and qgraph needs "
                                                      r"onnxruntime 1\.19 or newer: "
                                                      r"pip install -U \"onnxruntime>=1\.19\""):
        supported_versions()


def test_an_unreadable_onnxruntime_version_is_refused(monkeypatch, fresh_runtime_caches):
    monkeypatch.setattr(runtime.ort, "__version__", "unknown")
    with pytest.raises(UnsupportedRuntimeError, match="cannot read the installed onnxruntime's version"):
        runtime.installed_onnxruntime()

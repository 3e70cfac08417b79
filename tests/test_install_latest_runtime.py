"""tools/check_latest_runtime.py's own decisions: which Python it picks, when it makes a new environment, and when the
two environments' example numbers fail the check. (The check itself runs after the suite in the README's test
command.)"""

from __future__ import annotations

import pytest

from tools import check_latest_runtime as check


def numbers(onnxruntime: str, fp32_top1: float, int8_top1: float, fp32_ms: float, int8_ms: float) -> dict:
    return {"onnxruntime": onnxruntime, "speedup": fp32_ms / int8_ms,
            "rows": {"FP32": {"top1": fp32_top1, "latency_ms": fp32_ms},
                     "INT8": {"top1": int8_top1, "latency_ms": int8_ms}}}


def test_agreeing_environments_pass():
    assert check.compare(numbers("1.19.2", 93.2, 93.15, 1.0, 0.5), numbers("1.32.0", 93.2, 93.05, 1.0, 0.45), 0.5) == []


def test_an_accuracy_gap_beyond_the_tolerance_fails_naming_both_runtimes():
    failures = check.compare(numbers("1.19.2", 93.2, 93.15, 1.0, 0.5), numbers("1.32.0", 93.2, 92.0, 1.0, 0.5), 0.5)
    assert failures == ["INT8 top-1 93.15% on onnxruntime 1.19.2 but 92.00% on 1.32.0 (tolerance 0.5 points)"]


def test_int8_not_faster_than_fp32_fails_in_either_environment():
    failures = check.compare(numbers("1.19.2", 93.2, 93.15, 1.0, 0.5), numbers("1.32.0", 93.2, 93.15, 1.0, 1.1), 0.5)
    assert failures == ["INT8 is not faster than FP32 on onnxruntime 1.32.0 (0.91x)"]


def test_the_newest_supported_python_is_picked(monkeypatch):
    found = {"/p/3.10": (3, 10), "/p/3.13": (3, 13), "/p/3.14": (3, 14), "/p/3.12": (3, 12)}
    monkeypatch.setattr(check, "candidate_pythons", lambda: list(found))
    monkeypatch.setattr(check, "python_version", found.get)
    assert check.newest_python() == ("/p/3.13", (3, 13))


def test_no_supported_python_is_a_clear_failure(monkeypatch):
    monkeypatch.setattr(check, "candidate_pythons", lambda: [])
    with pytest.raises(check.CheckFailed, match="give one with --python"):
        check.newest_python()


def test_the_environment_is_keyed_by_python_runtime_release_and_install_inputs(monkeypatch, tmp_path):
    monkeypatch.setattr(check, "CACHE", tmp_path)
    monkeypatch.setattr(check, "latest_onnxruntime", lambda python: "1.32.0")
    folder = check.environment_folder("python", (3, 13))
    assert folder.parent == tmp_path and folder.name == f"py3.13-ort1.32.0-{check.install_inputs_hash()}"
    monkeypatch.setattr(check, "latest_onnxruntime", lambda python: "1.33.0")
    assert check.environment_folder("python", (3, 13)).name.startswith("py3.13-ort1.33.0-")


def test_without_the_package_index_the_newest_cached_environment_is_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(check, "CACHE", tmp_path)
    monkeypatch.setattr(check, "latest_onnxruntime", lambda python: None)
    with pytest.raises(check.CheckFailed, match="no second environment is cached"):
        check.environment_folder("python", (3, 13))
    cached = tmp_path / f"py3.13-ort1.31.1-{check.install_inputs_hash()}"
    cached.mkdir()
    assert check.environment_folder("python", (3, 13)) == cached

"""The two ways in, as a user meets them: what each install declares, and the refusals when the runtime is missing,
too old, or has no training API (README, "Which install"). Everything here runs on any supported onnxruntime, in the
training environment and in the latest-runtime one alike."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from packaging.requirements import Requirement

import qgraph.native
from qgraph import runtime
from qgraph.cli import cli
from qgraph.errors import QGraphError, RuntimeNotInstalledError, UnsupportedRuntimeError
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.qat.options import QATOptions
from qgraph.train.ort_training import TrainingUnavailableError, require_training_api

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DISTRIBUTIONS = set(runtime.ONNXRUNTIME_DISTRIBUTIONS)
NATIVE_LIBRARIES = ("qgraph.native._quantizer_gradient",)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(entries: list[str], python: str) -> dict[str, Requirement]:
    """The requirements among ``entries`` that apply on CPython ``python`` (their markers evaluated there)."""
    found = {}
    for requirement in map(Requirement, entries):
        if requirement.marker is None or requirement.marker.evaluate({"python_version": python}):
            found[requirement.name] = requirement
    return found


@pytest.fixture()
def no_training_api(monkeypatch):
    """The installed onnxruntime as the plain wheel has it: no onnxruntime/training folder."""
    monkeypatch.setattr(runtime, "training_directory", lambda: None)


def conv_files(folder: Path) -> tuple[Path, Path]:
    """A Conv + Relu model and calibration data for it."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["output"])],
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializer=[weight],
    )
    model = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    calibration = folder / "calib.npz"
    np.savez(calibration, input=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))
    return model, calibration


# ---------------------------------------------------------------------------------------------------------------
# What each install declares.


@pytest.mark.parametrize("python", ["3.10", "3.12", "3.13"])
def test_the_base_install_declares_no_runtime_and_leaves_onnx_unpinned(python):
    base = _requirements(_project()["dependencies"], python)
    assert RUNTIME_DISTRIBUTIONS.isdisjoint(base)
    assert {"onnx", "onnx-ir", "numpy", "networkx", "click"} <= set(base)
    assert all(specifier.operator == ">=" for specifier in base["onnx"].specifier)


def test_the_cpu_extra_brings_any_onnxruntime_from_1_19():
    cpu = _requirements(_project()["optional-dependencies"]["cpu"], "3.13")
    assert set(cpu) == {"onnxruntime"}
    specifier = cpu["onnxruntime"].specifier
    assert specifier.contains("1.19.0") and specifier.contains("1.32.0") and specifier.contains("1.40.1")
    assert not specifier.contains("1.18.1")


@pytest.mark.parametrize(("python", "brought"), [("3.10", True), ("3.12", True), ("3.13", False)])
def test_the_qat_extra_brings_the_last_training_runtime_and_an_onnx_it_reads_where_it_has_wheels(python, brought):
    qat = _requirements(_project()["optional-dependencies"]["qat"], python)
    assert set(qat) == ({"onnxruntime-training-cpu", "onnx"} if brought else set())
    if brought:
        assert str(qat["onnxruntime-training-cpu"].specifier) == "==1.19.2"
        assert qat["onnx"].specifier.contains("1.17.0") and not qat["onnx"].specifier.contains("1.18.0")


@pytest.mark.parametrize(("python", "runtime_distribution"),
                         [("3.11", "onnxruntime-training-cpu"), ("3.13", "onnxruntime")])
def test_the_dev_extra_brings_the_training_runtime_where_it_can_and_the_plain_one_elsewhere(python,
                                                                                           runtime_distribution):
    dev = _requirements(_project()["optional-dependencies"]["dev"], python)
    assert RUNTIME_DISTRIBUTIONS & set(dev) == {runtime_distribution}
    assert {"pytest", "hypothesis", "packaging"} <= set(dev)


def test_python_3_13_may_install():
    assert Requirement(f"python{_project()['requires-python']}").specifier.contains("3.13.0")


def test_the_qat_marker_is_registered():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(marker.startswith("qat:") for marker in markers)


# ---------------------------------------------------------------------------------------------------------------
# No runtime, an old runtime, two runtimes.


def test_importing_qgraph_without_onnxruntime_names_both_extras():
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "try:\n    import qgraph\n"
            "except ImportError as error:\n    print(type(error).__name__, error)\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert completed.stdout.startswith("RuntimeNotInstalledError qgraph needs onnxruntime 1.19 or newer, and none is "
                                       "installed")
    assert 'pip install "qgraph[cpu]"' in completed.stdout and 'pip install "qgraph[qat]"' in completed.stdout
    assert issubclass(RuntimeNotInstalledError, QGraphError) and issubclass(RuntimeNotInstalledError, ImportError)


def test_the_command_line_refuses_an_old_onnxruntime_in_one_line(tmp_path, monkeypatch, fresh_runtime_caches):
    model, _ = conv_files(tmp_path)
    monkeypatch.setattr(runtime.ort, "__version__", "1.18.1")
    result = CliRunner().invoke(cli, ["optimize", str(model), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2, result.output
    assert "onnxruntime 1.18.1 is installed, and qgraph needs onnxruntime 1.19 or newer" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_a_session_is_refused_on_an_old_onnxruntime(monkeypatch, fresh_runtime_caches):
    monkeypatch.setattr(runtime.ort, "__version__", "1.16.0")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedRuntimeError, match=r"onnxruntime 1\.16\.0 is installed"):
        runtime.create_session(model)


def test_two_distributions_of_the_onnxruntime_module_are_warned_about(monkeypatch, fresh_runtime_caches, caplog):
    monkeypatch.setattr(runtime, "_installed_distributions", lambda: ("onnxruntime", "onnxruntime-training-cpu"))
    with caplog.at_level(logging.WARNING, logger="qgraph.runtime"):
        installation = runtime.installed_onnxruntime()
    assert installation.distributions == ("onnxruntime", "onnxruntime-training-cpu")
    assert "onnxruntime and onnxruntime-training-cpu all install the onnxruntime module" in caplog.text


def test_the_installed_runtime_is_one_distribution_of_a_supported_release():
    installation = runtime.installed_onnxruntime()
    assert installation.release >= runtime.MINIMUM_ONNXRUNTIME
    assert len(installation.distributions) == 1, installation.distributions


# ---------------------------------------------------------------------------------------------------------------
# --qat where the runtime cannot train.


def test_qat_without_a_training_runtime_says_exactly_what_to_install(tmp_path, no_training_api):
    model, calibration = conv_files(tmp_path)
    result = CliRunner().invoke(cli, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--calib",
                                      str(calibration), "--qat", "--train-data", str(calibration), "--distill"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    installed = runtime.installed_onnxruntime()
    assert (f"the installed onnxruntime {installed.version} (from {installed.distributions[0]}) has no training API"
            in lines[0])
    assert f'pip uninstall -y {installed.distributions[0]} && pip install "qgraph[qat]"' in lines[0]
    assert "onnxruntime-training-cpu 1.19.2" in lines[0] and "CPython 3.10-3.12" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_qat_is_refused_before_any_work(tmp_path, no_training_api):
    """Refused before the model is even read: the path given does not exist."""
    with pytest.raises(TrainingUnavailableError, match="has no training API"):
        optimize(tmp_path / "absent.onnx", tmp_path / "out.onnx", OptimizeOptions(qat=QATOptions()))


def test_the_command_line_without_qat_does_not_ask_for_the_training_runtime(tmp_path, no_training_api):
    model, calibration = conv_files(tmp_path)
    result = CliRunner().invoke(cli, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--calib",
                                      str(calibration)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(("python", "says_no_wheels"), [((3, 11), False), ((3, 13), True)])
def test_the_reason_says_when_this_python_has_no_training_wheels(no_training_api, python, says_no_wheels):
    reason = runtime.training_unavailable_reason(python)
    assert (f"this is CPython {python[0]}.{python[1]}, for which onnxruntime-training-cpu 1.19.2 has no wheels"
            in reason) is says_no_wheels


@pytest.mark.qat
def test_the_training_environment_has_the_training_api():
    assert runtime.training_unavailable_reason() is None
    require_training_api()


# ---------------------------------------------------------------------------------------------------------------
# The native libraries in the installed runtime.


@pytest.mark.parametrize("module", NATIVE_LIBRARIES)
def test_each_built_native_library_registers_in_the_installed_onnxruntime(module):
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{module} was not built (no C compiler at install)")
    assert qgraph.native.custom_operator_library(module) == spec.origin


@pytest.mark.parametrize("module", NATIVE_LIBRARIES)
def test_a_native_library_the_runtime_refuses_falls_back(module, monkeypatch, caplog):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} was not built (no C compiler at install)")

    class RefusingOptions:
        """Session options of a runtime that no longer serves the C API version the library asks for."""

        def register_custom_ops_library(self, path: str) -> None:
            raise RuntimeError(f"Failed to load library {path}")

    version = runtime.ort.__version__
    monkeypatch.setattr(runtime.ort, "SessionOptions", RefusingOptions)
    qgraph.native.custom_operator_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="qgraph.native"):
            assert qgraph.native.custom_operator_library(module) is None
        assert f"onnxruntime {version} refused qgraph's custom-operator library" in caplog.text
    finally:
        qgraph.native.custom_operator_library.cache_clear()

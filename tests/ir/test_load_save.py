"""Loading and saving as a user meets them: bad input refused with a precise error, good input normalised for the
runtime, external data read only from inside the model's folder, and saves that are atomic and never overwrite the
input."""

from __future__ import annotations

import builtins
import io
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph.ir.save as save_module
from qgraph import runtime
from qgraph.errors import ModelLoadError, OutputPathError, QGraphError, UnsupportedModelError
from qgraph.ir import load_model, save_model, supported_versions, versions


def add_relu_model(opset: int = 17, ir_version: int = 8, width: int = 64) -> onnx.ModelProto:
    """y = Relu(x + bias), with a ``width``-float bias initializer."""
    bias = numpy_helper.from_array(np.linspace(-1, 1, width, dtype=np.float32).reshape(1, width), "bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["sum"]), helper.make_node("Relu", ["sum"], ["y"])],
        "add_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width])],
        initializer=[bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def single_node_model(op_type: str, *, domain: str = "", opset: int = 17, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x"], ["y"], domain=domain)],
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(name, version) for name, version in extra_opsets]]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def write(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def expected_add_relu(x: np.ndarray) -> np.ndarray:
    width = x.shape[1]
    return np.maximum(x + np.linspace(-1, 1, width, dtype=np.float32).reshape(1, width), 0)


def run_saved(path: Path, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.create_session(path), {"x": x})["y"]


@pytest.fixture()
def runtime_of_release_1_19(monkeypatch) -> versions.SupportedVersions:
    """What onnxruntime 1.19 runs (IR <= 10, opset <= 21), whichever release is installed: every later one runs
    that too, and onnx's converter refusals below are written for opset 22 -> 21."""
    row = versions.limits_of_release((1, 19))
    pinned = versions.SupportedVersions("1.19.2", onnx.__version__, row.ir_version, row.opset)
    monkeypatch.setattr(versions, "supported_versions", lambda: pinned)
    return pinned


def external_model(folder: Path, location: str, *, length: int | None = None) -> Path:
    """A model whose bias points to external data at ``location`` (not written here)."""
    proto = add_relu_model()
    bias = proto.graph.initializer[0]
    bias.ClearField("raw_data")
    bias.ClearField("float_data")
    bias.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0", "length": str(64 * 4 if length is None else length)}
    for key, value in entries.items():
        entry = bias.external_data.add()
        entry.key, entry.value = key, value
    return write(proto, folder / "model.onnx")


@pytest.fixture()
def good_model(tmp_path) -> Path:
    return write(add_relu_model(), tmp_path / "model.onnx")


# ---------------------------------------------------------------------------------------------------------------
# Files that are not ONNX models.


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "absent.onnx")


def test_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        load_model(tmp_path / "empty.onnx")


def test_text_file(tmp_path):
    (tmp_path / "notes.onnx").write_text("this is a text file, not a model\n" * 20)
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "notes.onnx")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_bytes(tmp_path, seed):
    (tmp_path / "noise.onnx").write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "noise.onnx")


def test_truncated_protobuf(tmp_path, good_model):
    data = good_model.read_bytes()
    (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "half.onnx")


# ---------------------------------------------------------------------------------------------------------------
# Valid ONNX that the runtime cannot run, and versions brought within its range.


def test_domain_the_runtime_cannot_run(tmp_path):
    path = write(single_node_model("Frobnicate", domain="com.example", extra_opsets=[("com.example", 1)]),
                 tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="com.example"):
        load_model(path)


def test_operator_missing_from_the_opset(tmp_path):
    path = write(single_node_model("Frobnicate"), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="Frobnicate.*opset 17"):
        load_model(path)


def test_operator_newer_than_the_models_opset(tmp_path):
    # Gelu entered the default domain in opset 20.
    path = write(single_node_model("Gelu", opset=17), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="Gelu"):
        load_model(path)


def test_opset_newer_than_the_installed_runtime_converts_down_and_runs(tmp_path):
    supported = supported_versions()
    if supported.opset >= onnx.defs.onnx_opset_version():
        pytest.skip(f"onnx {onnx.__version__} knows no opset above the runtime's {supported.opset}")
    newer = supported.opset + 1
    path = write(add_relu_model(opset=newer, ir_version=min(supported.ir_version, 10)), tmp_path / "m.onnx")
    model = load_model(path)
    assert model.opset_imports[""] == supported.opset
    saved = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(saved).opset_import[0].version == supported.opset
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run_saved(saved, x), expected_add_relu(x), rtol=1e-6)


def test_opset_22_converts_down_to_21_for_onnxruntime_1_19_and_runs(tmp_path, runtime_of_release_1_19):
    path = write(add_relu_model(opset=22, ir_version=10), tmp_path / "m.onnx")
    model = load_model(path)
    assert model.opset_imports[""] == runtime_of_release_1_19.opset == 21
    saved = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(saved).opset_import[0].version == 21
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run_saved(saved, x), expected_add_relu(x), rtol=1e-6)


def test_opset_the_runtime_runs_is_kept(tmp_path):
    supported = supported_versions()
    path = write(add_relu_model(opset=supported.opset, ir_version=min(supported.ir_version, 10)), tmp_path / "m.onnx")
    assert load_model(path).opset_imports[""] == supported.opset


def test_opset_22_without_a_down_converter_is_refused_naming_both_versions(tmp_path, runtime_of_release_1_19):
    path = write(single_node_model("GlobalMaxPool", opset=22), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="cannot convert the model from opset 22 to opset 21") as error:
        load_model(path)
    assert "the model's opset 22 is newer than the installed onnxruntime 1.19.2 (IR <= 10, opset <= 21)" in str(
        error.value)


def test_opset_22_conversion_that_would_change_the_model_is_refused(tmp_path, runtime_of_release_1_19):
    """MaxPool's ceil_mode output size changed in opset 22: at opset 21 this model would compute 2x2, not 1x1."""
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[1, 1], strides=[2, 2], ceil_mode=1)],
        "ceil",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)], ir_version=10)
    path = write(proto, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="without changing it"):
        load_model(path)
    # The same pooling where both rules agree converts.
    next(attribute for attribute in proto.graph.node[0].attribute if attribute.name == "ceil_mode").i = 0
    load_model(write(proto, tmp_path / "floor.onnx"))


def test_ir_version_11_lowered_to_10_for_onnxruntime_1_19(tmp_path, runtime_of_release_1_19):
    path = write(add_relu_model(opset=21, ir_version=11), tmp_path / "m.onnx")
    model = load_model(path)
    assert model.ir_version == runtime_of_release_1_19.ir_version == 10
    saved = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(saved).ir_version == 10
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(run_saved(saved, x), expected_add_relu(x), rtol=1e-6)


def test_ir_version_newer_than_the_installed_runtime_is_lowered(tmp_path):
    supported = supported_versions()
    path = write(add_relu_model(opset=17, ir_version=supported.ir_version + 1), tmp_path / "m.onnx")
    model = load_model(path)
    assert model.ir_version == supported.ir_version
    saved = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(saved).ir_version == supported.ir_version
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(run_saved(saved, x), expected_add_relu(x), rtol=1e-6)


def test_save_writes_the_runtimes_ir_version_and_leaves_the_model_as_it_was(tmp_path, runtime_of_release_1_19):
    model = ir.serde.deserialize_model(add_relu_model(opset=17, ir_version=11))
    saved = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(saved).ir_version == 10 and model.ir_version == 11
    np.testing.assert_allclose(run_saved(saved, np.ones((2, 64), np.float32)),
                               expected_add_relu(np.ones((2, 64), np.float32)), rtol=1e-6)


def test_save_refuses_an_opset_newer_than_the_runtime_naming_both(tmp_path, runtime_of_release_1_19):
    model = ir.serde.deserialize_model(add_relu_model(opset=22, ir_version=10))
    with pytest.raises(UnsupportedModelError, match=r"opset 22 is newer than the installed onnxruntime 1\.19\.2 "
                                                     r"\(IR <= 10, opset <= 21\)"):
        save_model(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_every_refusal_is_a_qgraph_error(tmp_path):
    """The CLI turns QGraphError into exit status 2; a refusal must never surface as another exception type."""
    assert issubclass(ModelLoadError, QGraphError) and issubclass(UnsupportedModelError, QGraphError)


def test_constant_only_model_loads_saves_and_runs(tmp_path):
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(value, "c")),
            helper.make_node("Neg", ["c"], ["y"]),
        ],
        "constant_only",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    path = write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                 tmp_path / "c.onnx")
    model = load_model(path)
    assert len(model.graph.inputs) == 0
    saved = save_model(model, tmp_path / "out.onnx")
    onnx.checker.check_model(onnx.load(saved), full_check=True)
    np.testing.assert_array_equal(runtime.run(runtime.create_session(saved), {})["y"], -value)


def test_constant_only_model_through_the_canonical_pipeline(tmp_path):
    from qgraph.pipeline import optimize

    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(value, "c")),
            helper.make_node("Neg", ["c"], ["n"]),
            helper.make_node("Identity", ["n"], ["y"]),
        ],
        "constant_only",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    path = write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                 tmp_path / "c.onnx")
    result = optimize(path, tmp_path / "out.onnx")
    saved = onnx.load(result.output_path)
    onnx.checker.check_model(saved, full_check=True)
    assert "Constant" not in [node.op_type for node in saved.graph.node]
    np.testing.assert_array_equal(runtime.run(runtime.create_session(result.output_path), {})["y"], -value)


# ---------------------------------------------------------------------------------------------------------------
# External data: read only from inside the model's folder, complete, present.


class OpenRecorder:
    """Records every path opened through builtins.open, io.open, os.open and Path.open while active."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        for owner, name in ((builtins, "open"), (io, "open"), (os, "open")):
            original = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._wrap(original))

    def _wrap(self, original):
        def recording(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.paths.append(os.path.realpath(os.fsdecode(file)))
            return original(file, *args, **kwargs)

        return recording

    def opened(self, path: Path) -> bool:
        return os.path.realpath(path) in self.paths


def test_external_data_round_trip(tmp_path):
    wide = write(add_relu_model(width=1024), tmp_path / "wide.onnx")  # 4 KB: above save's inline threshold
    model = load_model(wide)
    out = save_model(model, tmp_path / "external.onnx", external_data=True)
    data_file = tmp_path / "external.onnx.data"
    assert data_file.is_file() and data_file.stat().st_size >= 1024 * 4
    proto = onnx.load(out, load_external_data=False)
    assert proto.graph.initializer[0].data_location == TensorProto.EXTERNAL
    again = load_model(out)
    np.testing.assert_array_equal(
        again.graph.initializers["bias"].const_value.numpy(), model.graph.initializers["bias"].const_value.numpy()
    )
    x = np.random.default_rng(1).standard_normal((2, 1024)).astype(np.float32)
    np.testing.assert_allclose(run_saved(out, x), expected_add_relu(x), rtol=1e-6)
    # Saving the reloaded model again, with external data into a new file and inline into another folder.
    again_external = save_model(again, tmp_path / "again.onnx", external_data=True)
    np.testing.assert_allclose(run_saved(again_external, x), expected_add_relu(x), rtol=1e-6)
    (tmp_path / "elsewhere").mkdir()
    inline = save_model(load_model(out), tmp_path / "elsewhere" / "inline.onnx", external_data=False)
    assert not (tmp_path / "elsewhere" / "inline.onnx.data").exists()
    np.testing.assert_allclose(run_saved(inline, x), expected_add_relu(x), rtol=1e-6)


def test_external_save_never_overwrites_the_data_file_it_reads(tmp_path):
    wide = write(add_relu_model(width=1024), tmp_path / "wide.onnx")
    first = save_model(load_model(wide), tmp_path / "first.onnx", external_data=True)
    data_before = (tmp_path / "first.onnx.data").read_bytes()
    model = load_model(first)  # its bias is memory-mapped from first.onnx.data
    with pytest.raises(OutputPathError):
        save_model(model, first, external_data=True)
    # Even when the caller names another input file, the data file the model reads from is protected.
    with pytest.raises(OutputPathError, match="external data would overwrite"):
        save_model(model, tmp_path / "first.onnx", input_path=tmp_path / "other.onnx", external_data=True)
    assert (tmp_path / "first.onnx.data").read_bytes() == data_before


def test_external_data_missing(tmp_path):
    path = external_model(tmp_path, "weights.bin")
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(path)


def test_external_data_shorter_than_declared(tmp_path):
    path = external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 100)  # 256 bytes declared
    with pytest.raises(ModelLoadError, match="shorter"):
        load_model(path)


def _secret_and_model_folder(tmp_path: Path, secret_folder: str) -> tuple[Path, Path]:
    """A data file ``secret.bin`` under ``tmp_path/secret_folder`` and an empty model folder ``tmp_path/model``."""
    outside = tmp_path / secret_folder / "secret.bin"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(np.ones(64, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    return outside, folder


def _assert_refused_unread(path: Path, outside: Path, monkeypatch, reason: str) -> OpenRecorder:
    """Loading ``path`` raises ModelLoadError matching ``reason`` and never opens ``outside``."""
    recorder = OpenRecorder(monkeypatch)
    with pytest.raises(ModelLoadError, match=reason):
        load_model(path)
    assert not recorder.opened(outside)
    return recorder


def test_external_data_absolute_location_refused_and_never_opened(tmp_path, monkeypatch):
    outside, folder = _secret_and_model_folder(tmp_path, "outside")
    path = external_model(folder, os.fspath(outside.resolve()))
    recorder = _assert_refused_unread(path, outside, monkeypatch, "absolute path")
    assert recorder.opened(path) or recorder.paths  # the recorder works


def test_external_data_dotdot_location_refused_and_never_opened(tmp_path, monkeypatch):
    outside, folder = _secret_and_model_folder(tmp_path, "")
    path = external_model(folder, "../secret.bin")
    _assert_refused_unread(path, outside, monkeypatch, "outside the model's folder")


def test_external_data_symlink_leaving_the_folder_refused(tmp_path, monkeypatch):
    outside, folder = _secret_and_model_folder(tmp_path, "")
    (folder / "weights.bin").symlink_to(outside)
    path = external_model(folder, "weights.bin")
    _assert_refused_unread(path, outside, monkeypatch, "outside the model's folder")


def test_external_data_inside_the_folder_loads(tmp_path):
    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "bias.bin").write_bytes(np.linspace(-1, 1, 64, dtype=np.float32).tobytes())
    path = external_model(folder, "weights/bias.bin")
    model = load_model(path)
    saved = save_model(model, tmp_path / "out.onnx")
    x = np.zeros((2, 64), np.float32)
    np.testing.assert_allclose(run_saved(saved, x), expected_add_relu(x), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Saving: never over the input, atomic, and honest about protobuf's 2 GB limit.


def leftovers(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith(".qgraph-"))


def test_output_equal_to_input_refused_and_input_untouched(good_model):
    before = good_model.read_bytes()
    model = load_model(good_model)
    with pytest.raises(OutputPathError, match="input model"):
        save_model(model, good_model)
    with pytest.raises(OutputPathError, match="input model"):
        save_model(model, good_model.parent / "." / good_model.name)
    assert good_model.read_bytes() == before
    assert leftovers(good_model.parent) == []


def test_output_through_a_symlink_to_the_input_refused(tmp_path, good_model):
    link = tmp_path / "link.onnx"
    link.symlink_to(good_model)
    before = good_model.read_bytes()
    with pytest.raises(OutputPathError):
        save_model(load_model(good_model), link)
    assert good_model.read_bytes() == before


def test_output_folder_missing_or_a_folder(tmp_path, good_model):
    model = load_model(good_model)
    with pytest.raises(OutputPathError, match="does not exist"):
        save_model(model, tmp_path / "absent" / "out.onnx")
    with pytest.raises(OutputPathError, match="folder"):
        save_model(model, tmp_path)


def test_model_over_the_protobuf_limit_refused_without_external_data(tmp_path, good_model, monkeypatch):
    model = load_model(good_model)
    monkeypatch.setattr(save_module, "PROTOBUF_LIMIT", 100)  # the bias alone is 256 bytes
    with pytest.raises(OutputPathError, match="external data"):
        save_model(model, tmp_path / "out.onnx", external_data=False)
    assert not (tmp_path / "out.onnx").exists()
    assert not (tmp_path / "out.onnx.data").exists()
    assert leftovers(tmp_path) == []
    # With external data allowed, the same model saves.
    saved = save_model(model, tmp_path / "out.onnx", external_data=True)
    assert saved.is_file() and (tmp_path / "out.onnx.data").is_file()


def test_size_decides_external_data_when_not_forced(tmp_path, good_model, monkeypatch):
    model = load_model(good_model)
    monkeypatch.setattr(save_module, "EXTERNAL_DATA_THRESHOLD", 100)
    save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    monkeypatch.setattr(save_module, "EXTERNAL_DATA_THRESHOLD", 10**9)
    save_model(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()


def test_failed_save_leaves_no_partial_file_and_no_temporary_folder(tmp_path, good_model, monkeypatch):
    model = load_model(good_model)
    destination = tmp_path / "out.onnx"
    destination.write_bytes(b"previous content")

    def failing_save(model, path, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(save_module.ir, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, destination)
    assert destination.read_bytes() == b"previous content"
    assert leftovers(tmp_path) == []
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]


def test_save_replaces_an_existing_output_completely(tmp_path, good_model):
    destination = tmp_path / "out.onnx"
    destination.write_bytes(b"old")
    save_model(load_model(good_model), destination)
    onnx.checker.check_model(onnx.load(destination), full_check=True)
    assert leftovers(tmp_path) == []


def test_loaded_model_remembers_its_source(good_model):
    model = load_model(good_model)
    assert model.meta["qgraph.source_path"] == os.fspath(good_model.resolve())
    assert isinstance(model, ir.Model)


def test_shape_inference_without_the_weights_bytes_infers_the_same_and_keeps_them():
    """The large initializers' bytes are held aside during inference: the same shapes, the same bytes after."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qgraph.ir.load import _infer_shapes

    generator = np.random.default_rng(0)
    weight = numpy_helper.from_array(generator.standard_normal((64, 3, 3, 3)).astype(np.float32), "w")
    target = numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "target")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "target"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, target])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = proto.SerializeToString()
    inferred = _infer_shapes(proto)
    full = onnx.shape_inference.infer_shapes(onnx.load_from_string(before), check_type=False, data_prop=True)
    assert {info.name: str(info.type) for info in inferred.graph.value_info} == {
        info.name: str(info.type) for info in full.graph.value_info}
    assert [str(output.type) for output in inferred.graph.output] == [str(output.type) for output in full.graph.output]
    shapes = {info.name: [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim]
              for info in inferred.graph.value_info}
    assert shapes["c"] == ["n", 64, 8, 8] and shapes["r"][1] == 4096  # the Reshape's target was read
    np.testing.assert_array_equal(numpy_helper.to_array(inferred.graph.initializer[0]), numpy_helper.to_array(weight))
    # inference that fails returns the model given, its bytes back in place
    broken = onnx.load_from_string(before)
    broken.graph.node[1].input[1] = "missing"
    kept = _infer_shapes(broken)
    np.testing.assert_array_equal(numpy_helper.to_array(kept.graph.initializer[0]), numpy_helper.to_array(weight))

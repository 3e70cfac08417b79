"""Probe outputs in onnxruntime's blocked (NCHWc) layout: same values, same ranges, only where that is exact."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph.calibrate.probes as probes
from models.resnet import build_resnet
from qgraph.annotate.annotator import annotate
from qgraph.calibrate.blocked_outputs import create_blocked_probe_session, edit_model
from qgraph.calibrate.driver import CalibrationConfig, calibrate
from qgraph.calibrate.probes import Probe, build_probes
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.targets import get_target


def _optimized(model: onnx.ModelProto) -> bytes:
    """``model`` as onnxruntime optimises it for this machine (ORT_ENABLE_ALL), serialized."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with open(options.optimized_model_filepath, "rb") as file:
            return file.read()


def _conv_model(channels: tuple[int, ...]) -> onnx.ModelProto:
    """Input with 16 channels, then one 3×3 Conv + Relu per entry of ``channels``; every Relu output is an output."""
    generator = np.random.default_rng(0)
    nodes, initializers, outputs = [], [], []
    previous, previous_channels = "x", 16
    for index, count in enumerate(channels):
        weight = generator.standard_normal((count, previous_channels, 3, 3)).astype(np.float32) * 0.2
        initializers.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{index}"], [f"c{index}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        outputs.append(helper.make_tensor_value_info(f"r{index}", TensorProto.FLOAT, None))
        previous, previous_channels = f"r{index}", count
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 8, 8])], outputs, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _has_blocked_layout() -> bool:
    """Whether onnxruntime uses NCHWc on this CPU (MLAS needs AVX2 or wider)."""
    optimized = onnx.load_from_string(_optimized(_conv_model((32,))))
    return any(node.op_type == "ReorderOutput" for node in optimized.graph.node)


BLOCKED = _has_blocked_layout()


def _small_resnet() -> tuple[ir.Model, object]:
    """The small ResNet with BatchNorm folded (as calibration sees it), and its annotation."""
    model = optimize(ir.serde.deserialize_model(build_resnet("small")), None, OptimizeOptions()).model
    return model, annotate(model, get_target("ort-cpu").rules())


def _batches(count: int = 3, batch: int = 8) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(1)
    return [{"input": generator.standard_normal((batch, 1, 28, 28)).astype(np.float32)} for _ in range(count)]


def test_blocked_probe_returns_each_tensors_values_in_another_order() -> None:
    model, plan = _small_resnet()
    tensors = list(plan.activations)
    plain = build_probes(model, tensors, threads=1)
    blocked = build_probes(model, tensors, threads=1, order_free=tensors)
    assert not plain.blocked
    assert bool(blocked.blocked) == BLOCKED
    feeds = _batches(1)[0]
    expected = dict(plain.run(feeds))
    got = dict(blocked.run(feeds))
    assert expected.keys() == got.keys()
    for tensor, values in expected.items():
        np.testing.assert_array_equal(np.sort(got[tensor], axis=None), np.sort(values, axis=None), err_msg=tensor)
    if BLOCKED:  # the blocked ones really come in another order, else this test would prove nothing
        assert any(not np.array_equal(got[tensor], expected[tensor]) for tensor in blocked.blocked)


@pytest.mark.parametrize("method", ["minmax", "ema", "entropy", "percentile", "mse"])
def test_calibrated_ranges_are_identical_with_blocked_outputs(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = CalibrationConfig(method=method, threads=2)
    model, plan = _small_resnet()
    with_blocked = calibrate(model, plan, _batches(), config).ranges
    monkeypatch.setattr(probes, "create_blocked_probe_session", lambda *arguments, **options: None)
    model, plan = _small_resnet()
    without = calibrate(model, plan, _batches(), config).ranges
    assert with_blocked == without


def test_only_order_free_unpadded_outputs_lose_their_reorder() -> None:
    # r0: 32 channels (no padding in any block); r1: 24 (padded to 32 with AVX-512); r2: 48, but not order-free
    model = _conv_model((32, 24, 48))
    session = create_blocked_probe_session(model, {"r0", "r1"}, threads=1, spinning=False)
    if not BLOCKED:  # no NCHWc on this CPU: nothing to remove
        assert session is None
        return
    assert session is not None
    assert [output.tensor for output in session.blocked] == ["r0"]
    assert session.blocked[0].channels == 32
    names = [output.name for output in session.session.get_outputs()]
    assert "r1" in names and "r2" in names and "r0" not in names


def test_the_edit_changes_only_the_removed_reorders_and_their_outputs() -> None:
    model = _conv_model((32, 64))
    optimized_bytes = _optimized(model)
    original = onnx.load_from_string(optimized_bytes)
    edited_model = ir.from_proto(onnx.load_from_string(optimized_bytes))
    blocked = edit_model(edited_model, frozenset({"r0", "r1"}))
    if not BLOCKED:
        assert blocked is None
        return
    edited = ir.to_proto(edited_model)
    renamed = {output.tensor: output.name for output in blocked}
    assert set(renamed) == {"r0", "r1"}
    kept_nodes = [node for node in original.graph.node
                  if not (node.op_type == "ReorderOutput" and node.output[0] in renamed)]
    assert [(node.op_type, list(node.input), list(node.output)) for node in edited.graph.node] == [
        (node.op_type, list(node.input), list(node.output)) for node in kept_nodes
    ]
    assert sorted(tensor.name for tensor in edited.graph.initializer) == sorted(
        tensor.name for tensor in original.graph.initializer
    )
    expected_outputs = [renamed.get(output.name, output.name) for output in original.graph.output]
    assert [output.name for output in edited.graph.output] == expected_outputs
    # nothing removable: no edit at all
    assert edit_model(ir.from_proto(onnx.load_from_string(optimized_bytes)), frozenset()) is None


def test_models_without_convolutions_or_order_free_tensors_keep_the_plain_probe() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert create_blocked_probe_session(model, {"y"}, threads=1, spinning=False) is None
    assert create_blocked_probe_session(_conv_model((32,)), set(), threads=1, spinning=False) is None


def test_a_failed_optimisation_falls_back_to_the_plain_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    import qgraph.calibrate.blocked_outputs as blocked_outputs

    def broken(*arguments, **options):
        raise RuntimeError("cannot save the optimised model")

    monkeypatch.setattr(blocked_outputs, "_optimized_without_reorders", broken)
    assert create_blocked_probe_session(_conv_model((32,)), {"r0"}, threads=1, spinning=False) is None


def test_a_padded_blocked_output_is_refused_at_run_time() -> None:
    session = ort.InferenceSession(_conv_model((32,)).SerializeToString(), providers=["CPUExecutionProvider"])
    probe = Probe(session, ["x"], ["r0"], ["r0"], [], ["r0"], {"r0": 24})  # says 24 channels, returns 32
    with pytest.raises(RuntimeError, match="24 channels"):
        probe.run({"x": np.ones((2, 16, 8, 8), np.float32)})


def test_calibration_returns_the_models_outputs_on_its_first_batches() -> None:
    model, plan = _small_resnet()
    batches = _batches()
    result = calibrate(model, plan, batches, CalibrationConfig(method="percentile", threads=2), keep_outputs=2)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert len(result.outputs) == 2 and all(list(outputs) == names for outputs in result.outputs)
    for outputs, batch in zip(result.outputs, batches):
        for name, expected in zip(names, session.run(names, batch)):
            np.testing.assert_allclose(outputs[name], expected, rtol=1e-5, atol=1e-5, err_msg=name)
    assert calibrate(model, plan, batches, CalibrationConfig()).outputs == ()  # only when asked for
    # a first batch cut to --calib-samples is not what the retained batch holds: no outputs then
    cut = calibrate(model, plan, batches, CalibrationConfig(samples=5), keep_outputs=2)
    assert cut.outputs == () and cut.samples == 5

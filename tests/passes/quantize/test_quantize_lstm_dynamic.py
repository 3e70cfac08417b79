"""QuantizeLSTMDynamic on hand-built LSTMs: the DynamicQuantizeLSTM signature, the transposed 8-bit weights, the
saturation guard, which nodes it replaces, and the numerics through onnxruntime (graph optimisation off).

The kernel quantizes its float operands at run time, so its output has no exact numpy reference; it is compared,
by SQNR, with the float LSTM run on the weights the pass stored (dequantized and transposed back) and with the
original float LSTM (measured when written, onnxruntime 1.19.2 on a 2-core x86 machine with VNNI: 41-47 dB against
the float LSTM over every direction and weight setting tested here; the bound is 35 dB).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.passes.quantize.quantize_lstm_dynamic import (
    SAFE_INT8_WEIGHT_MAGNITUDE,
    QuantizeLSTMDynamic,
    quantize_recurrent_weight,
)
from qgraph.quant.numerics import sqnr_db

SEQUENCE, BATCH, FEATURES, HIDDEN = 7, 3, 6, 5
MINIMUM_SQNR_DB = 35.0


def lstm_weights(directions: int, seed: int = 0) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(HIDDEN)
    return {
        "W": generator.uniform(-bound, bound, (directions, 4 * HIDDEN, FEATURES)).astype(np.float32),
        "R": generator.uniform(-bound, bound, (directions, 4 * HIDDEN, HIDDEN)).astype(np.float32),
        "B": generator.uniform(-bound, bound, (directions, 8 * HIDDEN)).astype(np.float32),
    }


def lstm_node(name: str, inputs, outputs, direction: str, **attributes) -> onnx.NodeProto:
    return helper.make_node("LSTM", inputs, outputs, hidden_size=HIDDEN, direction=direction, name=name, **attributes)


def lstm_model(direction: str = "forward", *, seed: int = 0, **attributes) -> onnx.ModelProto:
    """x [seq, batch, features] ─▶ LSTM ─▶ y [seq, D, batch, hidden], y_h [D, batch, hidden]."""
    directions = 2 if direction == "bidirectional" else 1
    weights = lstm_weights(directions, seed)
    graph = helper.make_graph(
        [lstm_node("lstm", ["x", "W", "R", "B"], ["y", "y_h"], direction, **attributes)], "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQUENCE, BATCH, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SEQUENCE, directions, BATCH, HIDDEN]),
         helper.make_tensor_value_info("y_h", TensorProto.FLOAT, [directions, BATCH, HIDDEN])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def replace(model: onnx.ModelProto, pass_instance, *, expect_modified: bool = True) -> onnx.ModelProto:
    """Run the pass: valid before and after, honest ``modified``, a second run changes nothing."""
    onnx.checker.check_model(model, full_check=True)
    result = pass_instance(ir.serde.deserialize_model(model))
    assert result.modified == expect_modified
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert not pass_instance(result.model).modified, "a second run modified the model"
    return proto


def initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def stored_weights_as_float(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """The ``[D, 4H, K]`` float weights that codes ``[D, K, 4H]`` with per-column ``[D, 4H]`` parameters stand for."""
    real = (codes.astype(np.float32) - zero_point[:, None, :].astype(np.float32)) * scale[:, None, :]
    return np.transpose(real, (0, 2, 1))


def inputs(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((SEQUENCE, BATCH, FEATURES)).astype(np.float32)}


# --- the weight layout ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [True, False])
def test_recurrent_weights_are_transposed_codes_with_one_scale_per_gate_column(per_channel):
    weight = lstm_weights(2)["W"]
    codes, scale, zero_point = quantize_recurrent_weight(weight, qmax=63, per_channel=per_channel)
    transposed = np.transpose(weight, (0, 2, 1))  # [D, K, 4H]
    assert codes.dtype == np.int8 and codes.shape == (2, FEATURES, 4 * HIDDEN)
    if per_channel:
        assert scale.shape == (2, 4 * HIDDEN)
        np.testing.assert_allclose(scale, np.abs(transposed).max(axis=1) / 63, rtol=1e-6)
        broadcast = scale[:, None, :]
    else:
        assert scale.shape == (2,)
        np.testing.assert_allclose(scale, np.abs(transposed).max(axis=(1, 2)) / 63, rtol=1e-6)
        broadcast = scale[:, None, None]
    assert scale.dtype == np.float32 and zero_point.dtype == np.int8 and not zero_point.any()
    assert zero_point.shape == scale.shape
    assert np.abs(codes).max() == 63  # symmetric, narrow: the largest weight lands on the end code
    assert np.all(np.abs(codes.astype(np.float32) * broadcast - transposed) <= broadcast / 2 * (1 + 1e-5))


def test_wide_codes_are_stored_as_uint8_unless_the_guard_is_off():
    weight = lstm_weights(1)["R"]
    codes, scale, zero_point = quantize_recurrent_weight(weight, qmax=127, per_channel=True)
    plain, plain_scale, plain_zero_point = quantize_recurrent_weight(weight, qmax=127, per_channel=True,
                                                                     guard_saturation=False)
    assert int(np.abs(plain.astype(np.int16)).max()) > SAFE_INT8_WEIGHT_MAGNITUDE
    assert plain.dtype == np.int8 and not plain_zero_point.any()
    assert codes.dtype == np.uint8 and zero_point.dtype == np.uint8 and np.all(zero_point == 128)
    np.testing.assert_array_equal(codes.astype(np.int16) - 128, plain)  # the same real weights
    np.testing.assert_array_equal(scale, plain_scale)


def test_an_all_zero_gate_column_gets_scale_one():
    weight = lstm_weights(1)["W"]
    weight[0, 3] = 0.0
    codes, scale, _ = quantize_recurrent_weight(weight, qmax=63, per_channel=True)
    assert scale[0, 3] == 1.0 and not codes[0, :, 3].any() and np.all(np.isfinite(scale))


# --- the pass ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("qmax, guard", [(63, True), (127, True), (127, False)])
def test_a_planned_lstm_becomes_dynamic_quantize_lstm(direction, qmax, guard):
    model = lstm_model(direction)
    directions = 2 if direction == "bidirectional" else 1
    proto = replace(model, QuantizeLSTMDynamic(nodes=("lstm",), qmax=qmax, guard_saturation=guard))
    assert [node.op_type for node in proto.graph.node] == ["DynamicQuantizeLSTM"]
    node = proto.graph.node[0]
    assert node.domain == "com.microsoft" and node.name == "lstm"
    assert {(opset.domain, opset.version) for opset in proto.opset_import} == {("", 17), ("com.microsoft", 1)}
    assert list(node.input) == ["x", "W_quantized", "R_quantized", "B", "", "", "", "",
                                "W_scale", "W_zero_point", "R_scale", "R_zero_point"]
    assert list(node.output) == ["y", "y_h"] and [value.name for value in proto.graph.output] == ["y", "y_h"]
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    assert attributes == {"hidden_size": HIDDEN, "direction": direction.encode()}
    stored = initializers(proto.graph)
    assert set(stored) == {"B", "W_quantized", "W_scale", "W_zero_point", "R_quantized", "R_scale", "R_zero_point"}
    assert stored["W_quantized"].shape == (directions, FEATURES, 4 * HIDDEN)
    assert stored["R_quantized"].shape == (directions, HIDDEN, 4 * HIDDEN)
    assert stored["W_scale"].shape == stored["R_zero_point"].shape == (directions, 4 * HIDDEN)
    widened = guard and qmax > SAFE_INT8_WEIGHT_MAGNITUDE
    assert stored["W_quantized"].dtype == (np.uint8 if widened else np.int8)
    original = lstm_weights(directions)
    for name in ("W", "R"):
        expected = quantize_recurrent_weight(original[name], qmax=qmax, per_channel=True, guard_saturation=guard)
        for array, suffix in zip(expected, ("quantized", "scale", "zero_point")):
            np.testing.assert_array_equal(stored[f"{name}_{suffix}"], array)
    np.testing.assert_array_equal(stored["B"], original["B"])  # the bias stays float

    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for tensor in reference.graph.initializer:
        if tensor.name in ("W", "R"):
            arrays = [stored[f"{tensor.name}_{suffix}"] for suffix in ("quantized", "scale", "zero_point")]
            tensor.CopyFrom(numpy_helper.from_array(stored_weights_as_float(*arrays), tensor.name))
    feeds = inputs()
    actual = runtime.run(runtime.create_session(proto), feeds)
    for name in ("y", "y_h"):
        assert sqnr_db(runtime.run(runtime.create_session(reference), feeds)[name], actual[name]) >= MINIMUM_SQNR_DB
        assert sqnr_db(runtime.run(runtime.create_session(model), feeds)[name], actual[name]) >= MINIMUM_SQNR_DB


def test_per_tensor_weights_have_one_scale_per_direction():
    proto = replace(lstm_model("bidirectional"), QuantizeLSTMDynamic(nodes=("lstm",), qmax=63, per_channel=False))
    stored = initializers(proto.graph)
    assert stored["W_scale"].shape == stored["W_zero_point"].shape == (2,)
    assert stored["R_scale"].shape == (2,)
    feeds = inputs(2)
    expected = runtime.run(runtime.create_session(lstm_model("bidirectional")), feeds)["y"]
    assert sqnr_db(expected, runtime.run(runtime.create_session(proto), feeds)["y"]) >= MINIMUM_SQNR_DB - 5


def test_optional_inputs_and_attributes_carry_over():
    weights = lstm_weights(1)
    initial = np.random.default_rng(3).standard_normal((1, BATCH, HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [lstm_node("lstm", ["x", "W", "R", "B", "", "h0"], ["", "", "y_c"], "forward", clip=3.0,
                   activations=["Sigmoid", "Tanh", "Tanh"], input_forget=1)],
        "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQUENCE, BATCH, FEATURES])],
        [helper.make_tensor_value_info("y_c", TensorProto.FLOAT, [1, BATCH, HIDDEN])],
        [*(numpy_helper.from_array(array, name) for name, array in weights.items()),
         numpy_helper.from_array(initial, "h0")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    proto = replace(model, QuantizeLSTMDynamic(nodes=("lstm",), qmax=63))
    node = proto.graph.node[0]
    assert list(node.input[:8]) == ["x", "W_quantized", "R_quantized", "B", "", "h0", "", ""]
    assert list(node.output) == ["", "", "y_c"]
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    assert attributes["clip"] == pytest.approx(3.0) and attributes["input_forget"] == 1
    assert attributes["activations"] == [b"Sigmoid", b"Tanh", b"Tanh"]
    feeds = inputs(4)
    expected = runtime.run(runtime.create_session(model), feeds)["y_c"]
    assert sqnr_db(expected, runtime.run(runtime.create_session(proto), feeds)["y_c"]) >= MINIMUM_SQNR_DB


def test_only_the_planned_lstms_are_replaced():
    first = lstm_weights(1, seed=5)
    bound = 1.0 / np.sqrt(HIDDEN)
    generator = np.random.default_rng(6)
    second = {"W2": generator.uniform(-bound, bound, (1, 4 * HIDDEN, HIDDEN)).astype(np.float32),
              "R2": generator.uniform(-bound, bound, (1, 4 * HIDDEN, HIDDEN)).astype(np.float32)}
    graph = helper.make_graph(
        [lstm_node("first", ["x", "W", "R", "B"], ["y1"], "forward"),
         helper.make_node("Squeeze", ["y1", "axis"], ["s1"], name="squeeze"),
         lstm_node("second", ["s1", "W2", "R2"], ["y2"], "forward")],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQUENCE, BATCH, FEATURES])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [SEQUENCE, 1, BATCH, HIDDEN])],
        [*(numpy_helper.from_array(array, name) for name, array in {**first, **second}.items()),
         numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    proto = replace(model, QuantizeLSTMDynamic(nodes=("first",), qmax=63))
    assert [node.op_type for node in proto.graph.node] == ["DynamicQuantizeLSTM", "Squeeze", "LSTM"]
    assert list(proto.graph.node[2].input) == ["s1", "W2", "R2"]
    stored = initializers(proto.graph)
    assert "W" not in stored and stored["W2"].dtype == np.float32
    feeds = inputs(7)
    expected = runtime.run(runtime.create_session(model), feeds)["y2"]
    assert sqnr_db(expected, runtime.run(runtime.create_session(proto), feeds)["y2"]) >= MINIMUM_SQNR_DB


def test_an_lstm_in_an_if_branch_is_replaced_in_its_branch():
    weights = lstm_weights(1)
    then_branch = helper.make_graph([lstm_node("branch_lstm", ["x", "W", "R", "B"], ["then_y"], "forward")], "then",
                                    [], [helper.make_tensor_value_info("then_y", TensorProto.FLOAT,
                                                                       [SEQUENCE, 1, BATCH, HIDDEN])])
    else_branch = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x_tanh", "axis"], ["else_y"], name="unsqueeze")], "else", [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [SEQUENCE, 1, BATCH, FEATURES])])
    graph = helper.make_graph(
        [helper.make_node("Tanh", ["x"], ["x_tanh"], name="tanh"),
         helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="if")],
        "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQUENCE, BATCH, FEATURES]),
                     helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [*(numpy_helper.from_array(array, name) for name, array in weights.items()),
         numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model = onnx.shape_inference.infer_shapes(model)
    proto = replace(model, QuantizeLSTMDynamic(nodes=("branch_lstm",), qmax=63))
    if_node = proto.graph.node[1]
    then_graph = next(attribute.g for attribute in if_node.attribute if attribute.name == "then_branch")
    assert [(node.op_type, node.domain) for node in then_graph.node] == [("DynamicQuantizeLSTM", "com.microsoft")]
    assert "com.microsoft" in {opset.domain for opset in proto.opset_import}
    feeds = {**inputs(9), "c": np.array(True)}
    expected = runtime.run(runtime.create_session(model), feeds)["y"]
    assert sqnr_db(expected, runtime.run(runtime.create_session(proto), feeds)["y"]) >= MINIMUM_SQNR_DB


def test_lstms_not_named_are_left_alone():
    proto = replace(lstm_model(), QuantizeLSTMDynamic(nodes=("another",)), expect_modified=False)
    assert [node.op_type for node in proto.graph.node] == ["LSTM"]
    assert {opset.domain for opset in proto.opset_import} == {""}  # no contrib domain for nothing


@pytest.mark.parametrize("qmax", [0, 128])
def test_qmax_outside_the_int8_grid_is_refused(qmax):
    with pytest.raises(ValueError, match="qmax must lie in"):
        QuantizeLSTMDynamic(nodes=("lstm",), qmax=qmax)


# --- LSTMs the kernel cannot run --------------------------------------------------------------------------------------

def test_an_lstm_whose_weights_are_not_constants_is_left_alone():
    """W fed at run time: there is nothing to quantize ahead of time, so the LSTM stays as it is (today the pass
    raises AttributeError on the missing constant)."""
    weights = lstm_weights(1)
    graph = helper.make_graph(
        [lstm_node("lstm", ["x", "W", "R", "B"], ["y"], "forward")], "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQUENCE, BATCH, FEATURES]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 4 * HIDDEN, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SEQUENCE, 1, BATCH, HIDDEN])],
        [numpy_helper.from_array(weights[name], name) for name in ("R", "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    proto = replace(model, QuantizeLSTMDynamic(nodes=("lstm",), qmax=63), expect_modified=False)
    assert [node.op_type for node in proto.graph.node] == ["LSTM"]


def test_a_batch_first_lstm_is_left_alone():
    """DynamicQuantizeLSTM has no ``layout`` attribute: replacing an LSTM with ``layout=1`` would read its
    [batch, seq, features] input as [seq, batch, features] (today the pass drops the attribute and replaces it)."""
    weights = lstm_weights(1)
    graph = helper.make_graph(
        [lstm_node("lstm", ["x", "W", "R", "B"], ["y"], "forward", layout=1)], "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, SEQUENCE, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, SEQUENCE, 1, HIDDEN])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)  # (onnxruntime 1.19.2 cannot run layout=1 at all)
    result = QuantizeLSTMDynamic(nodes=("lstm",), qmax=63)(ir.serde.deserialize_model(model))
    assert not result.modified
    node = ir.serde.serialize_model(result.model).graph.node[0]
    assert node.op_type == "LSTM" and [attribute.name for attribute in node.attribute if attribute.name == "layout"]


def test_a_recurrence_weight_fed_as_a_graph_input_is_refused_with_the_reason(caplog):
    """R is an initializer that is also a graph input (a caller can override it): the LSTM stays; the log says why."""
    model = lstm_model()
    model.graph.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, [1, 4 * HIDDEN, HIDDEN]))
    with caplog.at_level("INFO", logger="qgraph.passes.quantize.quantize_lstm_dynamic"):
        proto = replace(model, QuantizeLSTMDynamic(nodes=("lstm",)), expect_modified=False)
    assert [node.op_type for node in proto.graph.node] == ["LSTM"]
    assert "leaving lstm (LSTM): the LSTM recurrence weight R 'R' is a graph input" in caplog.text

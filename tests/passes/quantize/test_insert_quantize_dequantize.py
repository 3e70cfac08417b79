"""InsertQuantizeDequantize writes the QDQ form of docs/qdq-format.md, checked line by line.

Plans and parameters are built by hand here (``QuantPlan`` + ``compute_quant_params``), so each test states exactly
what the pass was asked to do; the numpy references of :mod:`qgraph.quant.numerics` say what the graph must compute.
Every run goes through :func:`insert`: the model is valid (``onnx.checker`` full check) before and after, the
``modified`` flag is honest and a second run changes nothing. The last tests run the real annotator and calibration
(``qgraph.ptq.quantize(lower=False)``) for the parts of the contract the plan decides: the per-channel axis of each
compute op, fused activations and shared scales.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.annotate.annotator import annotate
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.passes.quantize.insert_quantize_dequantize import InsertQuantizeDequantize
from qgraph.ptq import QuantizeOptions
from qgraph.ptq import quantize as quantize_model
from qgraph.quant.numerics import dequantize, fake_quantize, quantization_step, quantize
from qgraph.quant.plan import BiasPlan, QuantPlan, WeightPlan
from qgraph.quant.spec import QuantSpec, compute_quant_params
from qgraph.targets import TargetOptions, get_target

OPSET = 17
UINT8 = QuantSpec.uint8()
INT8 = QuantSpec.int8()
WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True)
INT32_LIMIT = 2**31 - 1


# --- building models, plans and parameters ----------------------------------------------------------------------------

def floats(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def constant(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def plan_of(activations=(), weights=(), biases=(), *, activation_spec=UINT8) -> QuantPlan:
    return QuantPlan(target="ort-cpu", activation_spec=activation_spec, weight_spec=WEIGHT,
                     activations=tuple(activations), weights=tuple(weights), biases=tuple(biases), groups=(),
                     quantized_nodes=(), fp32_nodes={})


def weight_params(weight: np.ndarray, axis: int | None, spec: QuantSpec = WEIGHT, *, shrink: float = 1.0):
    """Symmetric parameters from the weight's range per channel along ``axis`` (per tensor for None), optionally
    from a range ``shrink`` times narrower (as an MSE-clipped range is), so that the largest weights saturate."""
    spec = spec.with_axis(axis)
    if axis is None:
        magnitude = np.abs(weight).max() * shrink
    else:
        magnitude = np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)).max(axis=1) * shrink
    return compute_quant_params(spec, -magnitude, magnitude)


def insert(model: onnx.ModelProto, plan: QuantPlan, parameters, *, expect_modified: bool = True) -> onnx.ModelProto:
    """Run the pass as the design notes ask: valid before and after, honest ``modified``, idempotent."""
    onnx.checker.check_model(model, full_check=True)
    result = InsertQuantizeDequantize(plan=plan, parameters=parameters)(ir.serde.deserialize_model(model))
    assert result.modified == expect_modified, f"modified={result.modified}, expected {expect_modified}"
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    again = InsertQuantizeDequantize(plan=plan, parameters=parameters)(result.model)
    assert not again.modified, "a second run modified the model"
    assert ir.serde.serialize_model(again.model).SerializeToString() == proto.SerializeToString()
    return proto


# --- reading the result -----------------------------------------------------------------------------------------------

def op_types(graph: onnx.GraphProto) -> list[str]:
    return [node.op_type for node in graph.node]


def producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    return next(node for node in graph.node if name in node.output)


def readers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def attribute(node: onnx.NodeProto, name: str):
    found = [helper.get_attribute_value(attr) for attr in node.attribute if attr.name == name]
    return found[0] if found else None


def run(model: onnx.ModelProto, feeds, *extra_outputs: str) -> dict[str, np.ndarray]:
    """The model's outputs on ``feeds`` (graph optimisation off), plus the float tensors named in ``extra_outputs``."""
    if extra_outputs:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.graph.output.extend(floats(name, None) for name in extra_outputs)
        model = copy
    return runtime.run(runtime.create_session(model), feeds)


def with_initializers(model: onnx.ModelProto, arrays) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``arrays`` hold the given values."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name in arrays:
            tensor.CopyFrom(constant(tensor.name, arrays[tensor.name].astype(np.float32)))
    return copy


def seeded(shape, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# --- activations ------------------------------------------------------------------------------------------------------

def relu_fan_out_model() -> onnx.ModelProto:
    """x ─▶ Relu ─▶ h ─▶ Sigmoid ─▶ a, and h ─▶ Tanh ─▶ b."""
    return make_model(
        [helper.make_node("Relu", ["x"], ["h"], name="relu"),
         helper.make_node("Sigmoid", ["h"], ["a"], name="sigmoid"),
         helper.make_node("Tanh", ["h"], ["b"], name="tanh")],
        [floats("x", [4, 8])], [floats("a", [4, 8]), floats("b", [4, 8])],
    )


def test_an_activation_gets_one_pair_right_after_its_producer():
    parameters = {"h": compute_quant_params(UINT8, 0.0, 1.5)}
    proto = insert(relu_fan_out_model(), plan_of(["h"]), parameters)
    graph = proto.graph
    assert op_types(graph) == ["Relu", "QuantizeLinear", "DequantizeLinear", "Sigmoid", "Tanh"]
    quantize_node, dequantize_node = graph.node[1], graph.node[2]
    assert list(quantize_node.input) == ["h", "h_scale", "h_zero_point"]
    # the pair shares one scale and one zero point; its outputs are "<t>_quantized"/"<t>_dequantized" when free
    assert list(dequantize_node.input) == [quantize_node.output[0], "h_scale", "h_zero_point"]
    assert quantize_node.output[0] == "h_quantized" and dequantize_node.output[0] == "h_dequantized"
    assert [list(node.input) for node in graph.node[3:]] == [["h_dequantized"], ["h_dequantized"]]
    assert [node.name for node in readers(graph, "h")] == [quantize_node.name]  # nothing else reads the float h
    stored = initializers(graph)
    assert stored["h_scale"].dtype == np.float32 and stored["h_scale"].shape == ()
    assert stored["h_scale"] == parameters["h"].scale
    assert stored["h_zero_point"].dtype == np.uint8 and stored["h_zero_point"].shape == ()
    assert stored["h_zero_point"] == parameters["h"].zero_point


def test_the_pair_computes_the_numpy_quantize_dequantize_exactly():
    parameters = {"h": compute_quant_params(UINT8, 0.0, 1.5)}  # narrower than the data: values above 1.5 saturate
    proto = insert(relu_fan_out_model(), plan_of(["h"]), parameters)
    x = seeded((4, 8), seed=1, scale=2.0)
    outputs = run(proto, {"x": x}, "h_dequantized")
    expected = fake_quantize(np.maximum(x, 0.0), parameters["h"])
    assert expected.max() == pytest.approx(255 * float(parameters["h"].scale))  # saturation is exercised
    np.testing.assert_array_equal(outputs["h_dequantized"], expected)
    np.testing.assert_allclose(outputs["a"], 1.0 / (1.0 + np.exp(-expected)), rtol=1e-6)
    np.testing.assert_allclose(outputs["b"], np.tanh(expected), rtol=1e-6, atol=1e-7)


def test_a_graph_input_gets_its_pair_before_every_node():
    model = make_model([helper.make_node("Sigmoid", ["x"], ["y"], name="sigmoid")], [floats("x", [3, 5])],
                       [floats("y", [3, 5])])
    parameters = {"x": compute_quant_params(UINT8, -2.0, 2.0)}
    proto = insert(model, plan_of(["x"]), parameters)
    assert op_types(proto.graph) == ["QuantizeLinear", "DequantizeLinear", "Sigmoid"]
    assert [value.name for value in proto.graph.input] == ["x"]
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the interface stays float
    assert list(proto.graph.node[2].input) == ["x_dequantized"]
    x = seeded((3, 5), seed=2)
    expected = 1.0 / (1.0 + np.exp(-fake_quantize(x, parameters["x"])))
    np.testing.assert_allclose(run(proto, {"x": x})["y"], expected, rtol=1e-6)


@pytest.mark.parametrize("spec, dtype, onnx_type", [
    (UINT8, np.uint8, TensorProto.UINT8),  # ort-cpu
    (INT8, np.int8, TensorProto.INT8),  # tensorrt: int8 symmetric, zero point 0
])
def test_the_zero_point_type_follows_the_activation_spec(spec, dtype, onnx_type):
    parameters = {"h": compute_quant_params(spec, -1.0, 3.0)}
    proto = insert(relu_fan_out_model(), plan_of(["h"], activation_spec=spec), parameters)
    zero_point = initializers(proto.graph)["h_zero_point"]
    assert zero_point.dtype == dtype and zero_point.shape == () and zero_point == parameters["h"].zero_point
    inferred = onnx.shape_inference.infer_shapes(proto)
    quantized = next(info for info in inferred.graph.value_info if info.name == "h_quantized")
    assert quantized.type.tensor_type.elem_type == onnx_type
    x = seeded((4, 8), seed=3, scale=2.0)
    expected = fake_quantize(np.maximum(x, 0.0), parameters["h"])
    np.testing.assert_array_equal(run(proto, {"x": x}, "h_dequantized")["h_dequantized"], expected)


def test_a_graph_output_keeps_its_name_and_its_float_value():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("Sigmoid", ["h"], ["y"], name="sig")],
        [floats("x", [4, 8])], [floats("h", [4, 8]), floats("y", [4, 8])],
    )
    parameters = {"h": compute_quant_params(UINT8, 0.0, 2.0)}
    proto = insert(model, plan_of(["h"]), parameters)
    assert [value.name for value in proto.graph.output] == ["h", "y"]
    assert producer(proto.graph, "h").op_type == "Relu"  # the graph output is the float producer output
    assert list(producer(proto.graph, "y").input) == ["h_dequantized"]  # its reader inside reads the pair
    x = seeded((4, 8), seed=4, scale=2.0)
    outputs = run(proto, {"x": x})
    relu = np.maximum(x, 0.0)
    np.testing.assert_array_equal(outputs["h"], relu)
    assert not np.array_equal(outputs["h"], fake_quantize(relu, parameters["h"]))  # so "h" really is not quantized
    np.testing.assert_allclose(outputs["y"], 1.0 / (1.0 + np.exp(-fake_quantize(relu, parameters["h"]))), rtol=1e-6)


# --- weights ----------------------------------------------------------------------------------------------------------

def matmul_model(weight: np.ndarray, *, weight_input: bool = False) -> onnx.ModelProto:
    inputs = [floats("x", [5, weight.shape[0]])]
    initializers_ = [constant("W", weight)]
    if weight_input:
        inputs.append(floats("W", list(weight.shape)))
        initializers_ = []
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], inputs,
                      [floats("y", [5, weight.shape[1]])], initializers_)


def assert_weight_form(graph: onnx.GraphProto, weight: str, consumer: str, codes: np.ndarray, params,
                       axis: int | None) -> None:
    """``consumer`` reads ``DequantizeLinear(Wq int8, s_w float32, z_w int8 zeros[, axis])`` and nothing quantizes W."""
    reader = next(node for node in graph.node if node.name == consumer)
    dequantize_node = producer(graph, reader.input[1])
    assert dequantize_node.op_type == "DequantizeLinear" and dequantize_node.output[0] == f"{weight}_dequantized"
    stored = initializers(graph)
    quantized, scale, zero_point = (stored[name] for name in dequantize_node.input)
    assert quantized.dtype == np.int8
    np.testing.assert_array_equal(quantized, codes)
    shape = () if axis is None else (codes.shape[axis],)
    assert scale.dtype == np.float32 and scale.shape == shape
    np.testing.assert_array_equal(scale, params.scale)
    assert zero_point.dtype == np.int8 and zero_point.shape == shape and not zero_point.any()
    assert attribute(dequantize_node, "axis") == axis
    assert weight not in stored, "the float weight is still stored"
    assert "QuantizeLinear" not in [node.op_type for node in graph.node if dequantize_node.input[0] in node.output
                                    or weight in node.input], "a weight is never quantized in the graph"


@pytest.mark.parametrize("axis", [1, None])
def test_a_weight_is_stored_int8_behind_one_dequantize(axis):
    weight = seeded((8, 6), seed=5)
    parameters = {"x": compute_quant_params(UINT8, -3.0, 3.0), "W": weight_params(weight, axis)}
    proto = insert(matmul_model(weight), plan_of(["x"], [WeightPlan("W", "matmul", axis)]), parameters)
    assert op_types(proto.graph) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]
    codes = quantize(weight, parameters["W"], clip_to_spec=True)
    assert_weight_form(proto.graph, "W", "matmul", codes, parameters["W"], axis)
    x = seeded((5, 8), seed=6)
    expected = fake_quantize(x, parameters["x"]) @ dequantize(codes, parameters["W"])
    np.testing.assert_allclose(run(proto, {"x": x})["y"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, low, high", [
    (WEIGHT, -127, 127),  # narrow range: the grid is symmetric, -128 is never written
    (QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, reduce_range=True), -63, 63),  # 7-bit
    (QuantSpec(bits=4, signed=True, symmetric=True, narrow_range=True), -7, 7),
])
def test_weight_codes_stay_on_the_spec_grid_when_the_range_clips(spec, low, high):
    weight = seeded((8, 6), seed=7)
    params = weight_params(weight, 1, spec, shrink=0.5)  # a clipped range: the largest weights saturate
    proto = insert(matmul_model(weight), plan_of([], [WeightPlan("W", "matmul", 1)]), {"W": params})
    codes = initializers(proto.graph)["W_quantized"]
    assert codes.dtype == np.int8 and codes.min() == low and codes.max() == high


# --- biases -----------------------------------------------------------------------------------------------------------

def conv_with_bias(bias: np.ndarray, weight: np.ndarray) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Conv", ["x", "W", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")],
        [floats("x", [1, weight.shape[1], 6, 6])], [floats("y", [1, weight.shape[0], 6, 6])],
        [constant("W", weight), constant("b", bias)],
    )


def gemm_with_bias(bias: np.ndarray, weight: np.ndarray) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1, name="gemm")],
        [floats("x", [3, weight.shape[1]])], [floats("y", [3, weight.shape[0]])],
        [constant("W", weight), constant("b", bias)],
    )


@pytest.mark.parametrize("build, weight_shape, consumer, per_channel", [
    (conv_with_bias, (4, 3, 3, 3), "conv", True),
    (conv_with_bias, (4, 3, 3, 3), "conv", False),
    (gemm_with_bias, (5, 7), "gemm", True),
])
def test_a_bias_is_int32_in_the_scale_of_input_times_weight(build, weight_shape, consumer, per_channel):
    weight = seeded(weight_shape, seed=8, scale=0.5)
    bias = seeded(weight_shape[:1], seed=9)
    model = build(bias, weight)
    parameters = {"x": compute_quant_params(UINT8, -2.5, 3.0), "W": weight_params(weight, 0 if per_channel else None)}
    plan = plan_of(["x"], [WeightPlan("W", consumer, 0)], [BiasPlan("b", consumer, "x", "W")])
    proto = insert(model, plan, parameters)

    reader = next(node for node in proto.graph.node if node.name == consumer)
    dequantize_node = producer(proto.graph, reader.input[2])
    assert dequantize_node.op_type == "DequantizeLinear" and attribute(dequantize_node, "axis") == 0
    quantized, scale, zero_point = (initializers(proto.graph)[name] for name in dequantize_node.input)
    channels = weight_shape[0]
    accumulator_scale = np.float64(parameters["x"].scale) * np.broadcast_to(
        parameters["W"].scale.astype(np.float64), (channels,))
    assert quantized.dtype == np.int32 and quantized.shape == (channels,)
    np.testing.assert_array_equal(quantized, np.rint(bias / accumulator_scale).astype(np.int32))
    assert scale.dtype == np.float32 and scale.shape == (channels,)
    np.testing.assert_array_equal(scale, accumulator_scale.astype(np.float32))
    assert zero_point.dtype == np.int32 and zero_point.shape == (channels,) and not zero_point.any()
    assert "b" not in initializers(proto.graph)

    x = seeded([1, weight_shape[1], 6, 6] if consumer == "conv" else [3, weight_shape[1]], seed=10, scale=1.5)
    codes = quantize(weight, parameters["W"], clip_to_spec=True)
    reference = with_initializers(model, {"W": dequantize(codes, parameters["W"]),
                                          "b": quantized.astype(np.float32) * scale})
    expected = run(reference, {"x": fake_quantize(x, parameters["x"])})["y"]
    np.testing.assert_allclose(run(proto, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_a_bias_beyond_int32_saturates_instead_of_wrapping():
    weight = seeded((2, 3, 3, 3), seed=11)
    bias = np.array([1e9, -1e9], np.float32)
    parameters = {"x": compute_quant_params(UINT8, 0.0, 0.01), "W": weight_params(weight, 0)}
    proto = insert(conv_with_bias(bias, weight),
                   plan_of(["x"], [WeightPlan("W", "conv", 0)], [BiasPlan("b", "conv", "x", "W")]), parameters)
    np.testing.assert_array_equal(initializers(proto.graph)["b_quantized"], [INT32_LIMIT, -INT32_LIMIT])


def test_a_bias_whose_activation_has_no_parameters_stays_float():
    weight, bias = seeded((4, 3, 3, 3), seed=12), seeded((4,), seed=13)
    parameters = {"W": weight_params(weight, 0)}  # x was not calibrated (a branch no batch takes)
    plan = plan_of(["x"], [WeightPlan("W", "conv", 0)], [BiasPlan("b", "conv", "x", "W")])
    proto = insert(conv_with_bias(bias, weight), plan, parameters)
    conv = producer(proto.graph, "y")
    assert list(conv.input) == ["x", "W_dequantized", "b"]  # the weight is still stored in int8
    np.testing.assert_array_equal(initializers(proto.graph)["b"], bias)


# --- a network, within one step of the numpy reference ----------------------------------------------------------------

def test_a_two_layer_network_is_within_one_step_of_the_numpy_reference():
    """x ─▶ Gemm ─▶ Relu ─▶ r ─▶ Gemm ─▶ y, planned as the contract writes it: the Relu is fused (only r is
    quantized), weights per output channel, biases int32."""
    w1, b1 = seeded((16, 8), seed=20, scale=0.4), seeded((16,), seed=21, scale=0.1)
    w2, b2 = seeded((4, 16), seed=22, scale=0.3), seeded((4,), seed=23, scale=0.1)
    model = make_model(
        [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1, name="fc2")],
        [floats("x", [32, 8])], [floats("y", [32, 4])],
        [constant("W1", w1), constant("b1", b1), constant("W2", w2), constant("b2", b2)],
    )
    x = seeded((32, 8), seed=24)
    float_relu = run(model, {"x": x}, "r")["r"]
    parameters = {
        "x": compute_quant_params(UINT8, float(x.min()), float(x.max())),
        "r": compute_quant_params(UINT8, 0.0, float(float_relu.max())),
        "W1": weight_params(w1, 0), "W2": weight_params(w2, 0),
    }
    plan = plan_of(["x", "r"], [WeightPlan("W1", "fc1", 0), WeightPlan("W2", "fc2", 0)],
                   [BiasPlan("b1", "fc1", "x", "W1"), BiasPlan("b2", "fc2", "r", "W2")])
    proto = insert(model, plan, parameters)
    assert op_types(proto.graph).count("QuantizeLinear") == 2 and op_types(proto.graph).count("DequantizeLinear") == 6
    assert producer(proto.graph, "r").op_type == "Relu" and list(producer(proto.graph, "r").input) == ["h"]

    def dequantized_weight(name, weight):
        return dequantize(quantize(weight, parameters[name], clip_to_spec=True), parameters[name]).astype(np.float64)

    def dequantized_bias(bias, activation, weight):
        accumulator = np.float64(parameters[activation].scale) * parameters[weight].scale.astype(np.float64)
        return np.rint(bias / accumulator) * accumulator.astype(np.float32)

    hidden = fake_quantize(x, parameters["x"]) @ dequantized_weight("W1", w1).T + dequantized_bias(b1, "x", "W1")
    reference_r = fake_quantize(np.maximum(hidden, 0.0).astype(np.float32), parameters["r"])
    outputs = run(proto, {"x": x}, "r_dequantized")
    step = float(quantization_step(parameters["r"]))
    assert np.abs(outputs["r_dequantized"] - reference_r).max() <= step * (1 + 1e-6)
    head = dequantized_weight("W2", w2)
    from_graph_r = outputs["r_dequantized"].astype(np.float64) @ head.T + dequantized_bias(b2, "r", "W2")
    np.testing.assert_allclose(outputs["y"], from_graph_r, rtol=1e-5, atol=1e-5)
    reference_y = reference_r.astype(np.float64) @ head.T + dequantized_bias(b2, "r", "W2")
    assert np.abs(outputs["y"] - reference_y).max() <= step * np.abs(head).sum(axis=1).max() + 1e-5


# --- what the plan cannot ask for, or does not ------------------------------------------------------------------------

def test_an_opset_below_13_is_refused():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [floats("x", [2])], [floats("y", [2])], opset=12)
    pass_instance = InsertQuantizeDequantize(plan=plan_of(["x"]), parameters={"x": compute_quant_params(UINT8, 0, 1)})
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 13"):
        pass_instance(ir.serde.deserialize_model(model))


def test_an_empty_plan_changes_nothing():
    model = relu_fan_out_model()
    proto = insert(model, plan_of(), {}, expect_modified=False)
    assert op_types(proto.graph) == op_types(model.graph)


def test_tensors_without_parameters_stay_float():
    weight = seeded((8, 6), seed=30)
    plan = plan_of(["x"], [WeightPlan("W", "matmul", 1)])
    proto = insert(matmul_model(weight), plan, {}, expect_modified=False)
    assert op_types(proto.graph) == ["MatMul"] and list(proto.graph.node[0].input) == ["x", "W"]


def test_a_weight_that_is_not_a_constant_is_left_float():
    weight = seeded((8, 6), seed=31)
    parameters = {"x": compute_quant_params(UINT8, -3.0, 3.0), "W": weight_params(weight, 1)}
    proto = insert(matmul_model(weight, weight_input=True), plan_of(["x"], [WeightPlan("W", "matmul", 1)]),
                   parameters)
    assert op_types(proto.graph) == ["QuantizeLinear", "DequantizeLinear", "MatMul"]
    assert list(producer(proto.graph, "y").input) == ["x_dequantized", "W"]


def test_a_plan_naming_an_absent_consumer_quantizes_nothing_there():
    weight = seeded((8, 6), seed=32)
    parameters = {"W": weight_params(weight, 1)}
    proto = insert(matmul_model(weight), plan_of([], [WeightPlan("W", "renamed_matmul", 1)]), parameters,
                   expect_modified=False)
    assert op_types(proto.graph) == ["MatMul"]


def test_a_weight_shared_with_a_float_reader_stays_stored_for_it():
    weight = seeded((6, 6), seed=33)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul"),
         helper.make_node("Add", ["y", "W"], ["z"], name="add")],
        [floats("x", [6, 6])], [floats("z", [6, 6])], [constant("W", weight)],
    )
    parameters = {"W": weight_params(weight, 1)}
    proto = insert(model, plan_of([], [WeightPlan("W", "matmul", 1)]), parameters)
    assert list(producer(proto.graph, "y").input) == ["x", "W_dequantized"]
    assert list(producer(proto.graph, "z").input) == ["y", "W"]  # the float reader keeps the float weight
    np.testing.assert_array_equal(initializers(proto.graph)["W"], weight)
    x = seeded((6, 6), seed=34)
    expected = x @ dequantize(quantize(weight, parameters["W"], clip_to_spec=True), parameters["W"]) + weight
    np.testing.assert_allclose(run(proto, {"x": x})["z"], expected, rtol=1e-5, atol=1e-6)


# --- If branches ------------------------------------------------------------------------------------------------------

def if_model():
    """x ─▶ Relu ─▶ h ─▶ If(c): then Gemm(h, W, b) ─▶ t ─▶ Relu, reading W and b of the main graph;
    else Gemm(h, W2, b) with W2 its own initializer and b of the main graph."""
    w, w2, b = seeded((6, 4), seed=40), seeded((6, 4), seed=41), seeded((6,), seed=42)
    then_branch = helper.make_graph(
        [helper.make_node("Gemm", ["h", "W", "b"], ["t"], transB=1, name="then_gemm"),
         helper.make_node("Relu", ["t"], ["then_out"], name="then_relu")],
        "then", [], [floats("then_out", [2, 6])])
    else_branch = helper.make_graph(
        [helper.make_node("Gemm", ["h", "W2", "b"], ["else_out"], transB=1, name="else_gemm")],
        "else", [], [floats("else_out", [2, 6])], [constant("W2", w2)])
    model = make_model(
        [helper.make_node("Relu", ["x"], ["h"], name="relu"),
         helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="if")],
        [floats("x", [2, 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [floats("y", [2, 6])],
        [constant("W", w), constant("b", b)],
    )
    parameters = {"h": compute_quant_params(UINT8, 0.0, 2.0), "t": compute_quant_params(UINT8, -4.0, 4.0),
                  "W": weight_params(w, 0), "W2": weight_params(w2, 0)}
    plan = plan_of(["h", "t"], [WeightPlan("W", "then_gemm", 0), WeightPlan("W2", "else_gemm", 0)],
                   [BiasPlan("b", "then_gemm", "h", "W"), BiasPlan("b", "else_gemm", "h", "W2")])
    return model, plan, parameters, (w, w2, b)


def branch(model: onnx.ModelProto, name: str) -> onnx.GraphProto:
    node = next(node for node in model.graph.node if node.op_type == "If")
    return next(attr.g for attr in node.attribute if attr.name == name)


def test_if_branches_are_quantized_where_their_values_live():
    model, plan, parameters, (w, w2, b) = if_model()
    proto = insert(model, plan, parameters)
    then_graph, else_graph = branch(proto, "then_branch"), branch(proto, "else_branch")
    # h is quantized once, in the graph that defines it; both branches read the outer dequantized value
    assert op_types(proto.graph) == ["Relu", "QuantizeLinear", "DequantizeLinear", "If"]
    assert "QuantizeLinear" not in op_types(else_graph)
    assert producer(then_graph, "t").input[0] == "h_dequantized" == producer(else_graph, "else_out").input[0]
    # t is quantized inside its branch, right after its producer; the branch output stays float
    assert op_types(then_graph) == ["DequantizeLinear", "DequantizeLinear", "Gemm", "QuantizeLinear",
                                    "DequantizeLinear", "Relu"]
    assert list(producer(then_graph, "then_out").input) == ["t_dequantized"]
    # weights and biases are stored quantized in the consumer's graph; the main graph keeps no float copies
    assert set(initializers(proto.graph)) == {"h_scale", "h_zero_point"}
    then_stored, else_stored = initializers(then_graph), initializers(else_graph)
    assert then_stored["W_quantized"].dtype == np.int8 and else_stored["W2_quantized"].dtype == np.int8
    assert "W2" not in else_stored
    # the bias both branches read gets one int32 copy per branch, each under a name unique in the whole model
    then_bias = producer(then_graph, producer(then_graph, "t").input[2]).input[0]
    else_bias = producer(else_graph, producer(else_graph, "else_out").input[2]).input[0]
    assert then_bias != else_bias and {then_bias, else_bias} == {"b_quantized", "b_quantized_1"}
    names = [tensor.name for graph in (proto.graph, then_graph, else_graph) for tensor in graph.initializer]
    assert len(names) == len(set(names))

    x = seeded((2, 4), seed=43, scale=2.0)
    h = fake_quantize(np.maximum(x, 0.0), parameters["h"])
    accumulator = {name: np.float64(parameters["h"].scale) * parameters[name].scale.astype(np.float64)
                   for name in ("W", "W2")}

    def gemm(weight_name, weight):
        codes = quantize(weight, parameters[weight_name], clip_to_spec=True)
        bias = np.rint(b / accumulator[weight_name]) * accumulator[weight_name].astype(np.float32)
        return h.astype(np.float64) @ dequantize(codes, parameters[weight_name]).T.astype(np.float64) + bias

    then_expected = np.maximum(fake_quantize(gemm("W", w).astype(np.float32), parameters["t"]), 0.0)
    np.testing.assert_allclose(run(proto, {"x": x, "c": np.array(True)})["y"], then_expected,
                               atol=float(parameters["t"].scale) * (1 + 1e-6))
    np.testing.assert_allclose(run(proto, {"x": x, "c": np.array(False)})["y"], gemm("W2", w2), rtol=1e-5, atol=1e-5)


# --- the contract through the real annotator --------------------------------------------------------------------------

def ort_cpu_plan(model: onnx.ModelProto) -> QuantPlan:
    rules = get_target("ort-cpu", TargetOptions(format="qdq", reduce_range="off")).rules()
    return annotate(ir.serde.deserialize_model(model), rules)


@pytest.mark.parametrize("op_type, weight_shape, attributes, axis", [
    ("Conv", (4, 3, 3, 3), {}, 0),
    ("ConvTranspose", (3, 4, 3, 3), {}, 1),
    ("MatMul", (3, 4), {}, 1),
    ("Gemm", (3, 4), {"transB": 0}, 1),
    ("Gemm", (4, 3), {"transB": 1}, 0),
])
def test_each_compute_op_is_quantized_per_channel_on_its_output_feature_axis(op_type, weight_shape, attributes, axis):
    weight = seeded(weight_shape, seed=50)
    spatial = op_type in ("Conv", "ConvTranspose")
    x_shape = [1, 3, 5, 5] if spatial else [2, 3]
    model = make_model([helper.make_node(op_type, ["x", "W"], ["y"], name="op", **attributes)],
                       [floats("x", x_shape)], [floats("y", None)], [constant("W", weight)])
    plan = ort_cpu_plan(model)
    assert plan.activations == ("x",)  # the graph output y stays float
    assert plan.weights == (WeightPlan("W", "op", axis),)
    parameters = {"x": compute_quant_params(UINT8, -2.0, 2.0), "W": weight_params(weight, axis, plan.weight_spec)}
    proto = insert(model, plan, parameters)
    codes = quantize(weight, parameters["W"], clip_to_spec=True)
    assert_weight_form(proto.graph, "W", "op", codes, parameters["W"], axis)
    assert codes.shape[axis] == 4  # the axis holds the output features
    x = seeded(x_shape, seed=51)
    reference = with_initializers(model, {"W": dequantize(codes, parameters["W"])})
    expected = run(reference, {"x": fake_quantize(x, parameters["x"])})["y"]
    np.testing.assert_allclose(run(proto, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_fused_activations_and_shared_scales_through_calibration():
    """Conv ─▶ Relu ─▶ MaxPool and Conv ─▶ Clip(0, 6) ─▶ Concat: no pair between a compute op and its activation;
    MaxPool and Concat share one (scale, zero point) across inputs and output."""
    model = make_model(
        [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
         helper.make_node("Conv", ["x", "W2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
         helper.make_node("Clip", ["c2", "low", "high"], ["r2"], name="relu6"),
         helper.make_node("Concat", ["p1", "r2"], ["joined"], axis=1, name="concat"),
         helper.make_node("Sigmoid", ["joined"], ["y"], name="head")],
        [floats("x", ["batch", 3, 8, 8])], [floats("y", None)],
        [constant("W1", seeded((4, 3, 3, 3), seed=60, scale=0.3)), constant("W2", seeded((4, 3, 3, 3), seed=59)),
         constant("low", np.float32(0.0)), constant("high", np.float32(6.0))],
    )
    batches = [{"x": seeded((2, 3, 8, 8), seed=61 + index)} for index in range(3)]
    options = QuantizeOptions(target_options=TargetOptions(format="qdq", reduce_range="off"), min_sqnr=None,
                              calibration=CalibrationConfig(method="minmax"))
    result = quantize_model(ir.serde.deserialize_model(model), batches, options, lower=False)
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    graph = proto.graph
    assert [node.op_type for node in readers(graph, "c1")] == ["Relu"]  # DQ → Conv → Relu → Q
    assert [node.op_type for node in readers(graph, "c2")] == ["Clip"]
    assert [node.op_type for node in readers(graph, "r1")] == ["QuantizeLinear"]
    assert [node.op_type for node in readers(graph, "r2")] == ["QuantizeLinear"]
    stored = initializers(graph)

    def params_of(tensor):
        quantize_node = readers(graph, tensor)[0]
        assert quantize_node.op_type == "QuantizeLinear"
        return float(stored[quantize_node.input[1]]), int(stored[quantize_node.input[2]])

    shared = {tensor: params_of(tensor) for tensor in ("r1", "p1", "r2", "joined")}
    assert len(set(shared.values())) == 1, shared
    assert shared["r1"][1] == 0  # a Relu range starts at 0: the zero point is the lowest code


# --- names and shared weights ----------------------------------------------------------------------------------------

def test_a_weight_shared_by_two_planned_consumers_is_stored_for_each():
    """Tied weights (two MatMuls reading one initializer) are planned once per consumer: each consumer must read its
    own DequantizeLinear, and the model must stay valid (each value and node name defined once)."""
    weight = seeded((4, 6), seed=70)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="first"),
         helper.make_node("MatMul", ["x2", "W"], ["y2"], name="second")],
        [floats("x", [2, 4]), floats("x2", [2, 4])], [floats("y", [2, 6]), floats("y2", [2, 6])],
        [constant("W", weight)],
    )
    parameters = {"W": weight_params(weight, 1)}
    proto = insert(model, plan_of([], [WeightPlan("W", "first", 1), WeightPlan("W", "second", 1)]), parameters)
    graph = proto.graph
    names = [name for node in graph.node for name in node.output] + [tensor.name for tensor in graph.initializer]
    assert len(names) == len(set(names)), "a name is defined twice"
    assert len({node.name for node in graph.node}) == len(graph.node), "two nodes share a name"
    codes = quantize(weight, parameters["W"], clip_to_spec=True)
    for consumer in ("y", "y2"):
        dequantize_node = producer(graph, producer(graph, consumer).input[1])
        assert dequantize_node.op_type == "DequantizeLinear"
        np.testing.assert_array_equal(initializers(graph)[dequantize_node.input[0]], codes)
    feeds = {"x": seeded((2, 4), seed=71), "x2": seeded((2, 4), seed=72)}
    outputs = run(proto, feeds)
    real = dequantize(codes, parameters["W"])
    np.testing.assert_allclose(outputs["y"], feeds["x"] @ real, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["y2"], feeds["x2"] @ real, rtol=1e-5, atol=1e-6)


def test_new_value_names_never_clash_with_existing_ones():
    """A model may already hold a tensor named like the pair the pass writes (``<t>_quantized``): the model must
    stay valid, with every value defined once."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["x_quantized"], name="relu"),
         helper.make_node("Sigmoid", ["x_quantized"], ["y"], name="sigmoid")],
        [floats("x", [2, 4])], [floats("y", [2, 4])],
    )
    parameters = {"x": compute_quant_params(UINT8, -2.0, 2.0)}
    proto = insert(model, plan_of(["x"]), parameters)
    names = [name for node in proto.graph.node for name in node.output]
    assert len(names) == len(set(names)), f"a value is defined twice: {names}"
    x = seeded((2, 4), seed=73)
    expected = 1.0 / (1.0 + np.exp(-np.maximum(fake_quantize(x, parameters["x"]), 0.0)))
    np.testing.assert_allclose(run(proto, {"x": x})["y"], expected, rtol=1e-6)


def test_the_dequantizers_are_found_by_the_graph_when_their_names_carry_a_suffix():
    """Sensitivity and the report ask ``dequantized_tensors`` for the DequantizeLinear of a planned tensor. In a model
    that already holds ``x_quantized`` and ``x_dequantized``, and whose weight W two MatMuls share, the names get a
    suffix; the lookup must still find every pair and weight, so that the switchable graph disables each of them
    (all off is the float model bit for bit) and the report measures every activation."""
    from qgraph.passes.quantize.insert_quantize_dequantize import dequantized_tensors
    from qgraph.report import layer_errors
    from qgraph.sensitivity_graph import ENABLE_INPUT, build_switchable_model, find_layers

    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["x_quantized"], name="first"),
         helper.make_node("Relu", ["x_quantized"], ["x_dequantized"], name="relu"),
         helper.make_node("MatMul", ["x_dequantized", "W"], ["t"], name="second"),
         helper.make_node("Gemm", ["t", "W2", "b"], ["y"], transB=1, name="gemm")],
        [floats("x", [2, 4])], [floats("y", [2, 3])],
        [constant("W", seeded((4, 4), seed=80)), constant("W2", seeded((3, 4), seed=81)),
         constant("b", seeded((3,), seed=82))],
    )
    batches = [{"x": seeded((2, 4), seed=83 + index, scale=2.0)} for index in range(3)]
    options = QuantizeOptions(target_options=TargetOptions(format="qdq", reduce_range="off"), min_sqnr=None,
                              calibration=CalibrationConfig(method="minmax"))
    float_model = ir.serde.deserialize_model(model)
    result = quantize_model(ir.serde.deserialize_model(model), iter(batches), options, lower=False)
    plan = result.plan
    assert "x" in plan.activations and [entry.consumer for entry in plan.weights if entry.name == "W"] == [
        "first", "second"]
    qdq = ir.serde.deserialize_model(result.qdq_model)
    found = dequantized_tensors(qdq, plan)
    dequantizers = [node for node in qdq.graph if node.op_type == "DequantizeLinear"]
    assert set(found) == set(dequantizers)
    assert sorted(found.values()) == sorted([*plan.activations, "W", "W", "W2", "b"])
    by_tensor = {tensor: node.outputs[0].name for node, tensor in found.items()}
    assert by_tensor["x"] != "x_dequantized"  # the convention's name is taken: the pair's output has a suffix
    for node, tensor in found.items():
        if tensor in plan.activations:
            assert node.inputs[0].producer().inputs[0].name == tensor

    layers = find_layers(float_model, plan)
    switchable = build_switchable_model(float_model, plan, result.parameters, layers)
    onnx.checker.check_model(switchable, full_check=True)
    assert sum(node.op_type == "Where" for node in switchable.graph.node) == len(dequantizers)
    session = runtime.create_session(switchable)
    for batch in batches:
        on = session.run(None, {**batch, ENABLE_INPUT: np.ones(len(layers), bool)})[0]
        off = session.run(None, {**batch, ENABLE_INPUT: np.zeros(len(layers), bool)})[0]
        np.testing.assert_array_equal(on, run(result.qdq_model, batch)["y"])
        np.testing.assert_array_equal(off, run(model, batch)["y"])
        assert not np.array_equal(on, off)

    errors = layer_errors(model, result.qdq_model, plan, batches)
    assert [error.tensor for error in errors] == list(plan.activations)
    assert all(np.isfinite(error.sqnr_db) for error in errors)

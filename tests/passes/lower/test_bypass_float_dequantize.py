"""BypassFloatDequantize: float readers of DequantizeLinear(QuantizeLinear(x)) read x itself."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.passes.lower.bypass_float_dequantize import BypassFloatDequantize
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import count_ops, lower_and_check

SCALE, ZERO_POINT = 0.02, 128
SHAPE = [4, 16]


def residual_branch(*, dequantize_scale: float = SCALE, graph_output: bool = False, requantize: bool = False,
                    island: bool = False, constant_source: bool = False) -> onnx.ModelProto:
    """A transformer's residual branch after lowering: h = Tanh(x) is quantized to ``codes`` (a graph output here,
    standing in for the integer kernel that reads it) and the skip connection adds DequantizeLinear(codes) to x."""
    nodes = [helper.make_node("Tanh", ["x"], ["h"], name="normalize")]
    source = "weight" if constant_source else "h"
    nodes += [helper.make_node("QuantizeLinear", [source, "s", "z"], ["codes"], name="quantize"),
              helper.make_node("DequantizeLinear", ["codes", "s_dq", "z"], ["h_hat"], name="dequantize")]
    outputs = [helper.make_tensor_value_info("codes", TensorProto.UINT8, SHAPE)]
    if requantize:
        nodes.append(helper.make_node("QuantizeLinear", ["h_hat", "s", "z"], ["again"], name="requantize"))
        outputs.append(helper.make_tensor_value_info("again", TensorProto.UINT8, SHAPE))
    elif island:  # DQ → Relu → Q: a pass-through island onnxruntime fuses
        nodes += [helper.make_node("Relu", ["h_hat"], ["relu"], name="island_relu"),
                  helper.make_node("QuantizeLinear", ["relu", "s", "z"], ["relu_codes"], name="island_quantize")]
        outputs.append(helper.make_tensor_value_info("relu_codes", TensorProto.UINT8, SHAPE))
    else:
        nodes.append(helper.make_node("Add", ["x", "h_hat"], ["y"], name="residual"))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE))
    if graph_output:
        outputs.append(helper.make_tensor_value_info("h_hat", TensorProto.FLOAT, SHAPE))
    initializers = [numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
                    numpy_helper.from_array(np.array(dequantize_scale, np.float32), "s_dq"),
                    numpy_helper.from_array(np.uint8(ZERO_POINT), "z"),
                    numpy_helper.from_array(np.linspace(-1, 1, 64, dtype=np.float32).reshape(SHAPE), "weight")]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _float_residual(x: np.ndarray) -> np.ndarray:
    graph = helper.make_graph([helper.make_node("Tanh", ["x"], ["h"]), helper.make_node("Add", ["x", "h"], ["y"])],
                              "float", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return runtime.create_session(model).run(["y"], {"x": x})[0]


def test_the_residual_reads_the_float_tensor_and_the_codes_stay():
    model = residual_branch()
    # the float output moves by at most half a step (Tanh stays inside the range), the codes not at all
    lowered_ir, lowered, before, after = lower_and_check(model, BypassFloatDequantize(), float_atol=SCALE / 2 + 1e-6,
                                                         output_scales={"codes": (SCALE, ZERO_POINT)})
    np.testing.assert_array_equal(before["codes"], after["codes"])
    assert count_ops(lowered) == {"Tanh": 1, "QuantizeLinear": 1, "Add": 1}
    residual = next(node for node in lowered_ir.graph if node.op_type == "Add")
    assert residual.inputs[1].name == "h"
    # and the float output is now exactly the FP32 residual, where before it carried the rounding
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    session = runtime.create_session(lowered)
    np.testing.assert_array_equal(session.run(["y"], {"x": x})[0], _float_residual(x))
    assert np.abs(runtime.create_session(model).run(["y"], {"x": x})[0] - _float_residual(x)).max() > SCALE / 10


def test_a_pair_read_only_as_float_goes_entirely():
    model = residual_branch()
    model.graph.output.remove(model.graph.output[0])  # nothing integer reads the codes
    model = onnx.shape_inference.infer_shapes(model)  # their type, as the pipeline's loading infers it
    _, lowered, _, _ = lower_and_check(model, BypassFloatDequantize(), float_atol=SCALE / 2 + 1e-6)
    assert count_ops(lowered) == {"Tanh": 1, "Add": 1}


def test_a_graph_output_is_refused(caplog):
    assert_refused(residual_branch(graph_output=True), BypassFloatDequantize(), caplog, "graph output")


def test_a_requantization_is_refused(caplog):
    assert_refused(residual_branch(requantize=True), BypassFloatDequantize(), caplog, "requantization")


def test_an_island_onnxruntime_may_fuse_is_refused(caplog):
    assert_refused(residual_branch(island=True), BypassFloatDequantize(), caplog, "Q/DQ island")


def test_different_parameters_are_refused(caplog):
    assert_refused(residual_branch(dequantize_scale=2 * SCALE), BypassFloatDequantize(), caplog, "differ")


def test_a_constant_is_refused(caplog):
    assert_refused(residual_branch(constant_source=True), BypassFloatDequantize(), caplog, "a constant")


def test_nothing_else_matches():
    result = BypassFloatDequantize()(ir.serde.deserialize_model(_weights_only()))
    assert not result.modified


def _weights_only() -> onnx.ModelProto:
    """A weight's int8 codes → DequantizeLinear → MatMul: no QuantizeLinear before the DQ, nothing to bypass."""
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_codes", "w_scale"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])],
        [numpy_helper.from_array(np.ones((16, 2), np.int8), "w_codes"),
         numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

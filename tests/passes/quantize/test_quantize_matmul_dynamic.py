"""QuantizeMatMulDynamic: the com.microsoft kernels it writes, their numerics against numpy, sharing, refusals."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.passes.quantize.quantize_matmul_dynamic import QuantizeMatMulDynamic, quantize_columns

RNG = np.random.default_rng(0)
K, N = 32, 24


def _model(readers: int = 1, *, bias_first: bool = False, gemm: bool = False, weight_input: bool = False):
    weights = [RNG.standard_normal((K, N)).astype(np.float32) for _ in range(readers)]
    initializers, nodes, outputs = [], [], []
    for index, weight in enumerate(weights):
        name = f"w{index}"
        bias = f"b{index}"
        initializers.append(numpy_helper.from_array(weight.T.copy() if gemm else weight, name))
        initializers.append(numpy_helper.from_array(RNG.standard_normal(N).astype(np.float32), bias))
        if gemm:
            nodes.append(helper.make_node("Gemm", ["x", name, bias], [f"y{index}"], name=f"mm{index}", transB=1,
                                          alpha=0.5, beta=2.0))
        else:
            nodes.append(helper.make_node("MatMul", ["x", name], [f"p{index}"], name=f"mm{index}"))
            nodes.append(helper.make_node("Add", [bias, f"p{index}"] if bias_first else [f"p{index}", bias],
                                          [f"y{index}"], name=f"add{index}"))
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, [6, N] if gemm else [2, 5, N]))
    shape = [6, K] if gemm else [2, 5, K]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w0", TensorProto.FLOAT, [K, N]))
        initializers = [tensor for tensor in initializers if tensor.name != "w0"]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), weights


def _reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, qmax: int = 127) -> np.ndarray:
    """DynamicQuantizeLinear's uint8 activation times per-column int8 weights, in numpy."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255.0
    zero = np.clip(np.rint(-low / scale), 0, 255)
    codes = np.clip(np.rint(x / scale) + zero, 0, 255)
    weight_codes, weight_scale, _ = quantize_columns(weight, qmax=qmax, per_channel=True, guard_saturation=False)
    return (scale * weight_scale * ((codes - zero) @ weight_codes.astype(np.float64))).astype(np.float32) + bias


def _run(proto, feeds):
    return runtime.run(runtime.create_session(proto), feeds)


@pytest.mark.parametrize("bias_first", [False, True])
def test_one_reader_becomes_dynamic_quantize_matmul_with_the_bias(bias_first):
    proto, weights = _model(bias_first=bias_first)
    bias = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "b0"))
    model = ir.serde.deserialize_model(proto)
    result = QuantizeMatMulDynamic(nodes=("mm0",), guard_saturation=False)(model)
    assert result.modified
    lowered = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(lowered, full_check=True)
    assert [node.op_type for node in lowered.graph.node] == ["DynamicQuantizeMatMul"]
    assert lowered.graph.output[0].name == "y0"
    x = RNG.standard_normal((2, 5, K)).astype(np.float32)
    got = _run(lowered, {"x": x})["y0"]
    np.testing.assert_allclose(got, _reference(x, weights[0], bias), rtol=1e-4, atol=1e-4)
    float_result = _run(proto, {"x": x})["y0"]
    assert np.max(np.abs(got - float_result)) < 0.05 * np.max(np.abs(float_result))
    assert not QuantizeMatMulDynamic(nodes=("mm0",))(result.model).modified


def test_readers_of_one_input_share_one_dynamic_quantize_linear():
    proto, weights = _model(readers=3)
    result = QuantizeMatMulDynamic(nodes=("mm0", "mm1", "mm2"), guard_saturation=False)(
        ir.serde.deserialize_model(proto)
    )
    lowered = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(lowered, full_check=True)
    assert Counter(node.op_type for node in lowered.graph.node) == {"DynamicQuantizeLinear": 1,
                                                                     "MatMulIntegerToFloat": 3}
    x = RNG.standard_normal((2, 5, K)).astype(np.float32)
    outputs = _run(lowered, {"x": x})
    for index, weight in enumerate(weights):
        bias = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == f"b{index}"))
        np.testing.assert_allclose(outputs[f"y{index}"], _reference(x, weight, bias), rtol=1e-4, atol=1e-4)


def test_gemm_with_trans_b_alpha_and_beta():
    proto, weights = _model(gemm=True)
    bias = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "b0"))
    lowered = ir.serde.serialize_model(
        QuantizeMatMulDynamic(nodes=("mm0",), guard_saturation=False)(ir.serde.deserialize_model(proto)).model)
    assert [node.op_type for node in lowered.graph.node] == ["DynamicQuantizeMatMul"]
    x = RNG.standard_normal((6, K)).astype(np.float32)
    np.testing.assert_allclose(_run(lowered, {"x": x})["y0"], _reference(x, weights[0] * 0.5, bias * 2.0),
                               rtol=1e-4, atol=1e-4)


def test_saturation_guard_stores_wide_codes_as_uint8():
    codes, scale, zero = quantize_columns(RNG.standard_normal((K, N)), qmax=127, per_channel=True,
                                          guard_saturation=True)
    assert codes.dtype == np.uint8 and np.all(zero == 128)
    narrow, _, narrow_zero = quantize_columns(RNG.standard_normal((K, N)), qmax=63, per_channel=True,
                                              guard_saturation=True)
    assert narrow.dtype == np.int8 and np.abs(narrow).max() <= 63 and np.all(narrow_zero == 0)


def test_unplanned_and_non_constant_weights_stay_float():
    proto, _ = _model(weight_input=True)
    assert not QuantizeMatMulDynamic(nodes=("mm0",))(ir.serde.deserialize_model(proto)).modified
    proto, _ = _model()
    assert not QuantizeMatMulDynamic(nodes=("other",))(ir.serde.deserialize_model(proto)).modified
    with pytest.raises(ValueError):
        QuantizeMatMulDynamic(qmax=200)

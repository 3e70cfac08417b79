"""LowerQLinearMatMul on hand-built QDQ MatMul islands."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph.passes.lower.lower_integer_matmul import LowerIntegerMatMul
from qgraph.passes.lower.lower_qlinear_matmul import LowerQLinearMatMul
from tests.passes.lower.islands import assert_refused, matmul_model
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [8, 7])
def test_quantized_matmul_lowers_to_qlinearmatmul(per_channel, bits):
    builder, out = matmul_model(quantized_output=True, per_channel=per_channel, bits=bits)
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, "QLinearMatMul": 1, "DequantizeLinear": 1}


def test_batched_left_operand_and_fused_relu():
    builder, out = matmul_model(quantized_output=True, activation="Relu", three_d=True)
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    assert "Relu" not in count_ops(lowered) and count_ops(lowered)["QLinearMatMul"] == 1


def test_per_channel_on_reduction_axis_is_refused():
    builder, _ = matmul_model(quantized_output=True, weight_axis=0)
    lower_and_check(builder.model(), LowerQLinearMatMul(), expect_modified=False)
    lower_and_check(builder.model(), LowerIntegerMatMul(), expect_modified=False)


def test_activation_times_activation():
    builder = QDQBuilder(seed=4)
    a = builder.quantize(builder.add_input("a", [4, 6]))
    b = builder.quantize(builder.add_input("b", [6, 3]))
    out = builder.output(builder.quantize(builder.node("MatMul", [a, b])))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered)["QLinearMatMul"] == 1


def test_weight_dequantize_shared_with_float_reader_is_kept():
    builder = QDQBuilder(seed=5)
    a = builder.quantize(builder.add_input("a", [3, 4]))
    weight_value, _ = builder.weight(np.random.default_rng(5).standard_normal((4, 4)).astype(np.float32), axis=1)
    out = builder.output(builder.quantize(builder.node("MatMul", [a, weight_value])))
    builder.output(builder.node("Relu", [weight_value]))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered)["DequantizeLinear"] == 2 and count_ops(lowered)["Relu"] == 1


def test_wide_weights_are_widened_to_uint8_unless_the_guard_is_off():
    builder, out = matmul_model(quantized_output=True)
    model, _, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    kernel = next(node for node in model.graph if node.op_type == "QLinearMatMul")
    assert kernel.inputs[3].dtype == ir.DataType.UINT8
    np.testing.assert_array_equal(kernel.inputs[5].const_value.numpy(), np.full(6, 128, np.uint8))

    model = ir.serde.deserialize_model(builder.model())
    result = LowerQLinearMatMul(guard_saturation=False)(model)
    assert result.modified
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    kernel = next(node for node in result.model.graph if node.op_type == "QLinearMatMul")
    assert kernel.inputs[3].dtype == ir.DataType.INT8 and kernel.inputs[5].dtype == ir.DataType.INT8


def test_int8_output_is_refused(caplog):
    builder = QDQBuilder(seed=3)
    a = builder.quantize(builder.add_input("a", [5, 8]))
    weight_value, _ = builder.weight(np.random.default_rng(3).standard_normal((8, 6)).astype(np.float32), axis=1)
    builder.output(builder.quantize(builder.node("MatMul", [a, weight_value]), dtype=np.int8))
    assert_refused(builder.model(), LowerQLinearMatMul(), caplog, "the kernel writes")

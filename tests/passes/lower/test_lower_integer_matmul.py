"""LowerIntegerMatMul on hand-built QDQ MatMul islands whose output stays float."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph.passes.lower.lower_integer_matmul import LowerIntegerMatMul
from qgraph.passes.lower.lower_qlinear_matmul import LowerQLinearMatMul
from tests.passes.lower.islands import assert_refused, matmul_model
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


def test_float_output_lowers_to_matmulinteger_and_rescale():
    builder, out = matmul_model(quantized_output=False)
    model = builder.model()
    lower_and_check(model, LowerQLinearMatMul(), expect_modified=False)
    _, lowered, _, _ = lower_and_check(model, LowerIntegerMatMul())
    assert count_ops(lowered) == {"QuantizeLinear": 1, "MatMulInteger": 1, "Cast": 1, "Mul": 1}


def test_integer_matmul_leaves_quantized_output_alone():
    builder, _ = matmul_model(quantized_output=True)
    lower_and_check(builder.model(), LowerIntegerMatMul(), expect_modified=False)


def matmul_integer_of(model: ir.Model) -> ir.Node:
    return next(node for node in model.graph if node.op_type == "MatMulInteger")


@pytest.mark.parametrize("per_channel, bits", [(False, 8), (True, 7), (False, 7)])
def test_per_tensor_and_seven_bit_weights(per_channel, bits):
    builder, _ = matmul_model(quantized_output=False, per_channel=per_channel, bits=bits)
    model, lowered, _, _ = lower_and_check(builder.model(), LowerIntegerMatMul())
    assert count_ops(lowered) == {"QuantizeLinear": 1, "MatMulInteger": 1, "Cast": 1, "Mul": 1}
    integer = matmul_integer_of(model)
    # 7-bit codes (|w| <= 63) cannot saturate the u8·s8 kernel and stay int8; 8-bit codes are widened to uint8
    assert integer.inputs[1].dtype == (ir.DataType.INT8 if bits == 7 else ir.DataType.UINT8)
    assert integer.inputs[3].const_value.numpy().shape == (() if not per_channel else (6,))


def test_guard_off_keeps_wide_int8_weights():
    builder, _ = matmul_model(quantized_output=False)
    model = ir.serde.deserialize_model(builder.model())
    stored = next(node for node in model.graph if node.op_type == "DequantizeLinear" and
                  node.inputs[0].dtype == ir.DataType.INT8).inputs[0]
    assert int(np.abs(stored.const_value.numpy().astype(np.int16)).max()) > 64
    result = LowerIntegerMatMul(guard_saturation=False)(model)
    assert result.modified
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    assert matmul_integer_of(result.model).inputs[1] is stored  # the contract's int8 codes, unchanged


def test_activation_times_activation_with_float_output():
    builder = QDQBuilder(seed=4)
    a = builder.quantize(builder.add_input("a", [4, 6]))
    b = builder.quantize(builder.add_input("b", [6, 3]))
    builder.output(builder.node("MatMul", [a, b]))
    model, lowered, _, _ = lower_and_check(builder.model(), LowerIntegerMatMul())
    assert count_ops(lowered) == {"QuantizeLinear": 2, "MatMulInteger": 1, "Cast": 1, "Mul": 1}
    integer = matmul_integer_of(model)
    assert [value.dtype for value in integer.inputs] == [ir.DataType.UINT8] * 4


def test_int8_right_activation_is_refused(caplog):
    builder = QDQBuilder(seed=4)
    a = builder.quantize(builder.add_input("a", [4, 6]))
    b = builder.quantize(builder.add_input("b", [6, 3]), dtype=np.int8)
    builder.output(builder.node("MatMul", [a, b]))
    assert_refused(builder.model(), LowerIntegerMatMul(), caplog, "only uint8 per tensor is taken")


def test_int8_left_operand_is_refused(caplog):
    builder = QDQBuilder(seed=4)
    a = builder.quantize(builder.add_input("a", [4, 6]), dtype=np.int8)
    weight_value, _ = builder.weight(np.random.default_rng(4).standard_normal((6, 3)).astype(np.float32), axis=1)
    builder.output(builder.node("MatMul", [a, weight_value]))
    assert_refused(builder.model(), LowerIntegerMatMul(), caplog, "the kernel takes")


def test_per_channel_three_dimensional_weight_is_refused(caplog):
    builder = QDQBuilder(seed=4)
    a = builder.quantize(builder.add_input("a", [2, 4, 6]))
    weight_value, _ = builder.weight(np.random.default_rng(4).standard_normal((2, 6, 3)).astype(np.float32), axis=2)
    builder.output(builder.node("MatMul", [a, weight_value]))
    assert_refused(builder.model(), LowerIntegerMatMul(), caplog, "of a 2-D weight only")

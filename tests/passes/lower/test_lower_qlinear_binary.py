"""LowerQLinearBinary on hand-built QDQ Add/Mul islands."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.passes.lower.lower_qlinear_binary import LowerQLinearBinary
from tests.passes.lower.islands import assert_refused, dequantize_constant
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


@pytest.mark.parametrize("op_type, kernel", [("Add", "QLinearAdd"), ("Mul", "QLinearMul")])
@pytest.mark.parametrize("broadcast", [False, True])
def test_binary(op_type, kernel, broadcast):
    builder = QDQBuilder(seed=8)
    a = builder.quantize(builder.add_input("a", [1, 4, 5, 5]))
    b = builder.quantize(builder.add_input("b", [1, 4, 1, 1] if broadcast else [1, 4, 5, 5]))
    out = builder.output(builder.quantize(builder.node(op_type, [a, b])))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearBinary(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 2, kernel: 1, "DequantizeLinear": 1}


def test_residual_add_relu_is_fused_and_float_consumer_refused():
    builder = QDQBuilder(seed=9)
    a = builder.quantize(builder.add_input("a", [2, 6]))
    b = builder.quantize(builder.add_input("b", [2, 6]))
    out = builder.output(builder.quantize(builder.node("Relu", [builder.node("Add", [a, b])])))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearBinary(), output_scales={out: builder.scales[out]})
    assert "Relu" not in count_ops(lowered)

    builder = QDQBuilder(seed=9)
    a = builder.quantize(builder.add_input("a", [2, 6]))
    b = builder.quantize(builder.add_input("b", [2, 6]))
    builder.output(builder.node("Add", [a, b]))  # float graph output: nothing to lower
    lower_and_check(builder.model(), LowerQLinearBinary(), expect_modified=False)


def test_int8_input_is_refused():
    builder = QDQBuilder(seed=10)
    a = builder.quantize(builder.add_input("a", [3]), dtype=np.int8)
    b = builder.quantize(builder.add_input("b", [3]))
    builder.output(builder.quantize(builder.node("Mul", [a, b])))
    lower_and_check(builder.model(), LowerQLinearBinary(), expect_modified=False)


def test_constant_operand_behind_a_dequantize_lowers():
    builder = QDQBuilder(seed=15)
    a = builder.quantize(builder.add_input("a", [2, 6]))
    constant = dequantize_constant(builder, np.arange(6, dtype=np.uint8).reshape(1, 6) * 40, 0.02, 100)
    out = builder.output(builder.quantize(builder.node("Mul", [a, constant])))
    model, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearBinary(),
                                           output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, "QLinearMul": 1, "DequantizeLinear": 1}
    kernel = next(node for node in model.graph if node.op_type == "QLinearMul")
    assert kernel.domain == "com.microsoft" and kernel.inputs[3].const_value is not None  # the constant's codes


def test_output_read_as_float_besides_its_quantize_is_refused(caplog):
    builder = QDQBuilder(seed=9)
    a = builder.quantize(builder.add_input("a", [2, 6]))
    b = builder.quantize(builder.add_input("b", [2, 6]))
    total = builder.node("Add", [a, b])
    builder.output(builder.quantize(total))
    builder.output(builder.node("Sigmoid", [total]))
    assert_refused(builder.model(), LowerQLinearBinary(), caplog, "read as float")


def test_clip_the_output_range_does_not_imply_is_refused(caplog):
    builder = QDQBuilder(seed=9)
    a = builder.quantize(builder.add_input("a", [2, 6]))
    b = builder.quantize(builder.add_input("b", [2, 6]))
    clipped = builder.node("Clip", [builder.node("Add", [a, b]), builder.constant("lo", np.float32(0.0)),
                                    builder.constant("hi", np.float32(1.0))])
    builder.output(builder.quantize(clipped, scale=6.0 / 255, zero_point=0))
    assert_refused(builder.model(), LowerQLinearBinary(), caplog, "not implied by the output range")

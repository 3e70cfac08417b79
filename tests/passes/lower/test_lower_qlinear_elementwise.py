"""LowerQLinearBinary, LowerQLinearConcat, LowerQLinearPool, LowerQLinearUnary and LowerIntegerPassThrough."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.passes.lower.lower_integer_passthrough import LowerIntegerPassThrough
from qgraph.passes.lower.lower_qlinear_binary import LowerQLinearBinary
from qgraph.passes.lower.lower_qlinear_concat import LowerQLinearConcat
from qgraph.passes.lower.lower_qlinear_pool import LowerQLinearPool
from qgraph.passes.lower.lower_qlinear_unary import LowerQLinearUnary
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


def test_concat_with_different_input_scales():
    builder = QDQBuilder(seed=11)
    a = builder.quantize(builder.add_input("a", [1, 2, 3, 3]))
    b = builder.quantize(builder.add_input("b", [1, 5, 3, 3]), scale=0.1, zero_point=100)
    out = builder.output(builder.quantize(builder.node("Concat", [a, b], axis=1)))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearConcat(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 2, "QLinearConcat": 1, "DequantizeLinear": 1}


@pytest.mark.parametrize("op_type, attributes, kernel", [
    ("GlobalAveragePool", {}, "QLinearGlobalAveragePool"),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, "QLinearAveragePool"),
    ("AveragePool", {"kernel_shape": [2, 2], "count_include_pad": 1, "pads": [1, 1, 0, 0]}, "QLinearAveragePool"),
])
def test_pools(op_type, attributes, kernel):
    builder = QDQBuilder(seed=12)
    x = builder.quantize(builder.add_input("x", [1, 3, 7, 7]))
    out = builder.output(builder.quantize(builder.node(op_type, [x], **attributes)))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearPool(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, kernel: 1, "DequantizeLinear": 1}


def test_dilated_average_pool_is_refused():
    builder = QDQBuilder(seed=12)
    builder.opset = 19  # AveragePool has dilations from opset 19
    x = builder.quantize(builder.add_input("x", [1, 3, 7, 7]))
    builder.output(builder.quantize(builder.node("AveragePool", [x], kernel_shape=[2, 2], dilations=[2, 2])))
    lower_and_check(builder.model(), LowerQLinearPool(), expect_modified=False)


@pytest.mark.parametrize("op_type, attributes, kernel", [
    ("Sigmoid", {}, "QLinearSigmoid"), ("LeakyRelu", {"alpha": 0.2}, "QLinearLeakyRelu")])
def test_unary(op_type, attributes, kernel):
    builder = QDQBuilder(seed=13)
    x = builder.quantize(builder.add_input("x", [2, 16]))
    out = builder.output(builder.quantize(builder.node(op_type, [x], **attributes)))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearUnary(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, kernel: 1, "DequantizeLinear": 1}


def pass_through_model(op_type: str, same_params: bool = True, **attributes):
    builder = QDQBuilder(seed=14)
    x_float = builder.add_input("x", [1, 4, 6, 6])
    x = builder.quantize(x_float)
    inputs = [x]
    if op_type == "Reshape":
        inputs.append(builder.constant("shape", np.array([1, 4, 36], np.int64)))
    if op_type in ("Squeeze", "Unsqueeze"):
        inputs.append(builder.constant("axes", np.array([0], np.int64)))
    y = builder.node(op_type, inputs, **attributes)
    scale, zero_point = builder.scales[x]
    out = builder.output(builder.quantize(y, scale=scale if same_params else scale * 2, zero_point=zero_point))
    return builder, out


@pytest.mark.parametrize("op_type, attributes", [
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ("Reshape", {}), ("Transpose", {"perm": [0, 2, 3, 1]}), ("Flatten", {"axis": 1}),
    ("Squeeze", {}), ("Unsqueeze", {}),
])
def test_pass_through_runs_on_integers_exactly(op_type, attributes):
    builder, out = pass_through_model(op_type, **attributes)
    _, lowered, before, after = lower_and_check(builder.model(), LowerIntegerPassThrough(),
                                                output_scales={out: builder.scales[out]}, steps=0)
    expected = {"QuantizeLinear": 1, op_type: 1, "DequantizeLinear": 1}
    if op_type == "MaxPool":  # the fast uint8 MaxPool of onnxruntime is NhwcMaxPool
        expected = {"QuantizeLinear": 1, "Transpose": 2, "NhwcMaxPool": 1, "DequantizeLinear": 1}
    assert count_ops(lowered) == expected
    np.testing.assert_array_equal(before[out], after[out])


@pytest.mark.parametrize("attributes", [
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "dilations": [2, 2]},
])
def test_max_pool_channels_first_and_channels_last_agree_exactly(attributes):
    builder, out = pass_through_model("MaxPool", **attributes)
    for channels_last in (True, False):
        _, lowered, before, after = lower_and_check(
            builder.model(), LowerIntegerPassThrough(channels_last_max_pool=channels_last),
            output_scales={out: builder.scales[out]}, steps=0,
        )
        assert ("NhwcMaxPool" in count_ops(lowered)) == channels_last
        np.testing.assert_array_equal(before[out], after[out])


def test_pass_through_with_different_params_is_refused():
    builder, _ = pass_through_model("Transpose", same_params=False, perm=[0, 1, 3, 2])
    lower_and_check(builder.model(), LowerIntegerPassThrough(), expect_modified=False)

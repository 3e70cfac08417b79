"""LowerIntegerPassThrough on hand-built QDQ data-movement and MaxPool islands."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.passes.lower.lower_integer_passthrough import LowerIntegerPassThrough
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


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


def test_used_max_pool_indices_are_refused(caplog):
    builder = QDQBuilder(seed=14)
    x = builder.quantize(builder.add_input("x", [1, 2, 4, 4]))
    pooled, indices = builder.node("MaxPool", [x], outputs=2, kernel_shape=[2, 2])
    scale, zero_point = builder.scales[x]
    builder.output(builder.quantize(pooled, scale=scale, zero_point=zero_point))
    builder.output(indices)
    assert_refused(builder.model(), LowerIntegerPassThrough(), caplog, "a secondary output (MaxPool Indices) is used")


def test_max_pool_before_opset_12_is_refused(caplog):
    builder = QDQBuilder(seed=14)
    builder.opset = 11
    x = builder.quantize(builder.add_input("x", [1, 2, 4, 4]))
    scale, zero_point = builder.scales[x]
    builder.output(builder.quantize(builder.node("MaxPool", [x], kernel_shape=[2, 2]), scale=scale,
                                    zero_point=zero_point))
    assert_refused(builder.model(), LowerIntegerPassThrough(), caplog, "takes integer tensors from opset 12")


def test_per_channel_input_is_refused(caplog):
    builder = QDQBuilder(seed=14)
    x = builder.add_input("x", [1, 3, 2, 2])
    scale = builder.constant("s", np.array([0.02, 0.03, 0.04], np.float32))
    zero_point = builder.constant("z", np.array([128, 128, 128], np.uint8))
    quantized = builder.node("QuantizeLinear", [x, scale, zero_point], axis=1)
    dequantized = builder.node("DequantizeLinear", [quantized, scale, zero_point], axis=1)
    moved = builder.node("Transpose", [dequantized], perm=[0, 1, 3, 2])
    builder.output(builder.node("QuantizeLinear", [moved, scale, zero_point], axis=1))
    assert_refused(builder.model(), LowerIntegerPassThrough(), caplog, "the input is quantized per channel")


def test_float_reader_besides_the_quantize_is_refused(caplog):
    builder = QDQBuilder(seed=14)
    x = builder.quantize(builder.add_input("x", [1, 4, 6, 6]))
    flat = builder.node("Flatten", [x], axis=1)
    scale, zero_point = builder.scales[x]
    builder.output(builder.quantize(flat, scale=scale, zero_point=zero_point))
    builder.output(builder.node("Relu", [flat]))
    assert_refused(builder.model(), LowerIntegerPassThrough(), caplog, "read as float")

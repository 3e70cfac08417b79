"""LowerQLinearPool on hand-built QDQ GlobalAveragePool/AveragePool islands."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.passes.lower.lower_qlinear_pool import LowerQLinearPool
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


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


def test_pool_keeps_its_window_attributes_and_runs_channels_first():
    builder = QDQBuilder(seed=12)
    x = builder.quantize(builder.add_input("x", [1, 2, 6, 6]))
    out = builder.output(builder.quantize(builder.node("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2],
                                                       ceil_mode=1)))
    model, _, _, _ = lower_and_check(builder.model(), LowerQLinearPool(), output_scales={out: builder.scales[out]})
    kernel = next(node for node in model.graph if node.op_type == "QLinearAveragePool")
    assert kernel.domain == "com.microsoft" and kernel.attributes["channels_last"].as_int() == 0
    assert list(kernel.attributes["kernel_shape"].as_ints()) == [3, 3] and kernel.attributes["ceil_mode"].as_int() == 1


def test_int8_input_is_refused(caplog):
    builder = QDQBuilder(seed=12)
    x = builder.quantize(builder.add_input("x", [1, 3, 4, 4]), dtype=np.int8)
    builder.output(builder.quantize(builder.node("GlobalAveragePool", [x])))
    assert_refused(builder.model(), LowerQLinearPool(), caplog, "the kernel takes")


def test_output_read_as_float_is_refused(caplog):
    builder = QDQBuilder(seed=12)
    x = builder.quantize(builder.add_input("x", [1, 3, 4, 4]))
    pooled = builder.node("GlobalAveragePool", [x])
    builder.output(builder.quantize(pooled))
    builder.output(pooled)
    assert_refused(builder.model(), LowerQLinearPool(), caplog, "read as float")

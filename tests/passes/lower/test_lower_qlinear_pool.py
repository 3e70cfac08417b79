"""LowerQLinearPool on hand-built QDQ GlobalAveragePool/AveragePool islands."""

from __future__ import annotations

import pytest

from qgraph.passes.lower.lower_qlinear_pool import LowerQLinearPool
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

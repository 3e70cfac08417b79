"""LowerQLinearUnary on hand-built QDQ Sigmoid/LeakyRelu islands."""

from __future__ import annotations

import pytest

from qgraph.passes.lower.lower_qlinear_unary import LowerQLinearUnary
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


@pytest.mark.parametrize("op_type, attributes, kernel", [
    ("Sigmoid", {}, "QLinearSigmoid"), ("LeakyRelu", {"alpha": 0.2}, "QLinearLeakyRelu")])
def test_unary(op_type, attributes, kernel):
    builder = QDQBuilder(seed=13)
    x = builder.quantize(builder.add_input("x", [2, 16]))
    out = builder.output(builder.quantize(builder.node(op_type, [x], **attributes)))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearUnary(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, kernel: 1, "DequantizeLinear": 1}

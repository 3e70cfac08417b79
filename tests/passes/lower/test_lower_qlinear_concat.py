"""LowerQLinearConcat on hand-built QDQ Concat islands."""

from __future__ import annotations

from qgraph.passes.lower.lower_qlinear_concat import LowerQLinearConcat
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


def test_concat_with_different_input_scales():
    builder = QDQBuilder(seed=11)
    a = builder.quantize(builder.add_input("a", [1, 2, 3, 3]))
    b = builder.quantize(builder.add_input("b", [1, 5, 3, 3]), scale=0.1, zero_point=100)
    out = builder.output(builder.quantize(builder.node("Concat", [a, b], axis=1)))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearConcat(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 2, "QLinearConcat": 1, "DequantizeLinear": 1}

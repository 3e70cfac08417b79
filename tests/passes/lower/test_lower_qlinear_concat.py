"""LowerQLinearConcat on hand-built QDQ Concat islands."""

from __future__ import annotations

import numpy as np

from qgraph.passes.lower.lower_qlinear_concat import LowerQLinearConcat
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


def test_concat_with_different_input_scales():
    builder = QDQBuilder(seed=11)
    a = builder.quantize(builder.add_input("a", [1, 2, 3, 3]))
    b = builder.quantize(builder.add_input("b", [1, 5, 3, 3]), scale=0.1, zero_point=100)
    out = builder.output(builder.quantize(builder.node("Concat", [a, b], axis=1)))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearConcat(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 2, "QLinearConcat": 1, "DequantizeLinear": 1}


def test_concat_of_inputs_sharing_the_output_params_is_exact():
    builder = QDQBuilder(seed=11)
    a = builder.quantize(builder.add_input("a", [2, 3, 4]), scale=0.03, zero_point=120)
    b = builder.quantize(builder.add_input("b", [2, 1, 4]), scale=0.03, zero_point=120)
    c = builder.quantize(builder.add_input("c", [2, 5, 4]), scale=0.03, zero_point=120)
    out = builder.output(builder.quantize(builder.node("Concat", [a, b, c], axis=1), scale=0.03, zero_point=120))
    model, lowered, before, after = lower_and_check(builder.model(), LowerQLinearConcat(),
                                                    output_scales={out: builder.scales[out]}, steps=0)
    assert count_ops(lowered) == {"QuantizeLinear": 3, "QLinearConcat": 1, "DequantizeLinear": 1}
    np.testing.assert_array_equal(before[out], after[out])
    kernel = next(node for node in model.graph if node.op_type == "QLinearConcat")
    assert kernel.attributes["axis"].as_int() == 1 and len(kernel.inputs) == 2 + 3 * 3


def test_int8_input_is_refused(caplog):
    builder = QDQBuilder(seed=11)
    a = builder.quantize(builder.add_input("a", [2, 3]))
    b = builder.quantize(builder.add_input("b", [2, 3]), dtype=np.int8)
    builder.output(builder.quantize(builder.node("Concat", [a, b], axis=0)))
    assert_refused(builder.model(), LowerQLinearConcat(), caplog, "the kernel takes")


def test_float_graph_output_is_refused(caplog):
    builder = QDQBuilder(seed=11)
    a = builder.quantize(builder.add_input("a", [2, 3]))
    b = builder.quantize(builder.add_input("b", [2, 3]))
    builder.output(builder.node("Concat", [a, b], axis=0))
    assert_refused(builder.model(), LowerQLinearConcat(), caplog, "read as float")


def test_concat_with_a_float_input_is_not_matched():
    builder = QDQBuilder(seed=11)
    a = builder.quantize(builder.add_input("a", [2, 3]))
    b = builder.add_input("b", [2, 3])
    builder.output(builder.quantize(builder.node("Concat", [a, b], axis=0)))
    lower_and_check(builder.model(), LowerQLinearConcat(), expect_modified=False)

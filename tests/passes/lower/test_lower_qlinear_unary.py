"""LowerQLinearUnary on hand-built QDQ Sigmoid/LeakyRelu islands."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.passes.lower.lower_qlinear_unary import LowerQLinearUnary
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


@pytest.mark.parametrize("op_type, attributes, kernel", [
    ("Sigmoid", {}, "QLinearSigmoid"), ("LeakyRelu", {"alpha": 0.2}, "QLinearLeakyRelu")])
def test_unary(op_type, attributes, kernel):
    builder = QDQBuilder(seed=13)
    x = builder.quantize(builder.add_input("x", [2, 16]))
    out = builder.output(builder.quantize(builder.node(op_type, [x], **attributes)))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearUnary(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, kernel: 1, "DequantizeLinear": 1}


def test_leaky_relu_keeps_its_slope():
    builder = QDQBuilder(seed=13)
    x = builder.quantize(builder.add_input("x", [2, 16]))
    out = builder.output(builder.quantize(builder.node("LeakyRelu", [x], alpha=0.3)))
    model, _, _, _ = lower_and_check(builder.model(), LowerQLinearUnary(), output_scales={out: builder.scales[out]})
    kernel = next(node for node in model.graph if node.op_type == "QLinearLeakyRelu")
    assert kernel.domain == "com.microsoft" and kernel.attributes["alpha"].as_float() == pytest.approx(0.3)


def test_int8_input_is_refused(caplog):
    builder = QDQBuilder(seed=13)
    x = builder.quantize(builder.add_input("x", [2, 16]), dtype=np.int8)
    builder.output(builder.quantize(builder.node("Sigmoid", [x])))
    assert_refused(builder.model(), LowerQLinearUnary(), caplog, "the kernel takes")


def test_activation_between_the_op_and_its_quantize_is_refused(caplog):
    builder = QDQBuilder(seed=13)
    x = builder.quantize(builder.add_input("x", [2, 16]))
    builder.output(builder.quantize(builder.node("Relu", [builder.node("LeakyRelu", [x], alpha=0.2)])))
    assert_refused(builder.model(), LowerQLinearUnary(), caplog, "read as float")


def test_int8_output_is_refused(caplog):
    builder = QDQBuilder(seed=13)
    x = builder.quantize(builder.add_input("x", [2, 16]))
    builder.output(builder.quantize(builder.node("Sigmoid", [x]), dtype=np.int8))
    assert_refused(builder.model(), LowerQLinearUnary(), caplog, "the kernel writes")

"""FuseQuickGelu: SiLU, sigmoid-GELU and Swish-beta into com.microsoft QuickGelu, and the forms it refuses."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from qgraph.passes.canonicalize.fuse_quick_gelu import FuseQuickGelu
from qgraph.testing import check_pass, op_types
from tests.passes.canonicalize.activation_spellings import sigmoid_gate, widen


@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize(("alpha", "swap"), [(None, False), (None, True), (1.702, False), (1.702, True), (0.5, False)])
def test_sigmoid_gates_fuse_into_quick_gelu(alpha, swap, opset):
    model = sigmoid_gate(alpha, swap=swap, opset=opset)
    check = check_pass(model, FuseQuickGelu(fuse_silu=True), feeds=widen(model), rtol=1e-5, atol=1e-6)
    assert op_types(check.model) == ["QuickGelu"]
    node = next(iter(check.model.graph))
    assert node.domain == "com.microsoft"
    assert node.attributes["alpha"].as_float() == pytest.approx(1.0 if alpha is None else alpha)
    assert not check.model.graph.initializers


@pytest.mark.parametrize("alpha", [-1.0, 0.0])
def test_a_non_positive_alpha_is_refused(alpha, caplog):
    with caplog.at_level(logging.INFO):
        check_pass(sigmoid_gate(alpha), FuseQuickGelu(), expect_modified=False)
    assert "not a positive number" in caplog.text


def test_a_sigmoid_read_elsewhere_is_fan_out(caplog):
    model = sigmoid_gate(None)
    sigmoid = next(node for node in model.graph.node if node.op_type == "Sigmoid")
    model.graph.node.append(__import__("onnx").helper.make_node("Relu", [sigmoid.output[0]], ["other"]))
    model.graph.output.append(__import__("onnx").helper.make_tensor_value_info("other", 1, ["batch", 8, 5, 5]))
    with caplog.at_level(logging.INFO):
        check_pass(model, FuseQuickGelu(fuse_silu=True), expect_modified=False)
    assert "fan-out" in caplog.text


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_silu_stays_decomposed_by_default_where_it_lowers_to_integer_kernels(alpha):
    check_pass(sigmoid_gate(alpha), FuseQuickGelu(), expect_modified=False)
    check = check_pass(sigmoid_gate(1.702), FuseQuickGelu())
    assert op_types(check.model) == ["QuickGelu"]


def test_sigmoid_of_another_value_is_not_a_gate():
    import onnx

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 4] x, float[2, 4] z) => (float[2, 4] y) {
            s = Sigmoid(z)
            y = Mul(x, s)
        }""")
    check_pass(model, FuseQuickGelu(), expect_modified=False)
    np.testing.assert_equal(op_types(model), ["Sigmoid", "Mul"])

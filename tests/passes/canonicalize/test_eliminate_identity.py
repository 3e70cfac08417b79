"""EliminateIdentity: Identity and no-op Dropout / Cast / Reshape nodes go away; graph output names survive."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from qgraph.passes.canonicalize.eliminate_identity import EliminateIdentity, resolved_reshape
from qgraph.testing import TEXT_HEADER as HEADER
from qgraph.testing import check_pass, if_model_text, op_types, to_ir


def _relu_and_neg_left(text: str):
    """Run the pass on ``text`` (check_pass), assert only its Relu and Neg remain; the result and the Relu."""
    result = check_pass(text, EliminateIdentity())
    assert op_types(result.model) == ["Relu", "Neg"]
    return result, next(iter(result.model.graph))


def test_identity_chain_is_removed():
    text = HEADER + """
    g (float[2,3] x) => (float[2,3] y) {
      a = Identity(x)
      b = Identity(a)
      r = Relu(b)
      y = Neg(r)
    }
    """
    result, relu = _relu_and_neg_left(text)
    assert relu.inputs[0] is result.model.graph.inputs[0]


def test_identity_feeding_a_graph_output_hands_its_name_to_the_producer():
    text = HEADER + """
    g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
      r = Relu(x)
      y = Identity(r)
      z = Neg(r)
    }
    """
    result, relu = _relu_and_neg_left(text)
    assert [output.name for output in result.model.graph.outputs] == ["y", "z"]
    assert result.model.graph.outputs[0] is relu.outputs[0]
    assert result.proto.graph.node[1].input == ["y"]


@pytest.mark.parametrize(
    "text, reason",
    [
        (
            HEADER + "g (float[2] x) => (float[2] y) { y = Identity(x) }",
            "graph input",
        ),
        (
            HEADER + "g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Identity(w) }",
            "initializer",
        ),
        (
            HEADER + "g (float[2] x) => (float[2] r, float[2] y) { r = Relu(x) \n y = Identity(r) }",
            "both",
        ),
    ],
    ids=["graph-input", "initializer", "input-is-also-output"],
)
def test_identity_between_interface_values_is_kept(text, reason, caplog):
    with caplog.at_level(logging.INFO, logger="qgraph.passes.infrastructure"):
        result = check_pass(text, EliminateIdentity(), expect_modified=False)
    assert "Identity" in op_types(result.model)
    assert reason in caplog.text


def test_identity_on_a_graph_input_feeding_a_node_is_removed():
    text = HEADER + """
    g (float[4] x) => (float[4] y) {
      a = Identity(x)
      y = Sigmoid(a)
    }
    """
    result = check_pass(text, EliminateIdentity())
    assert op_types(result.model) == ["Sigmoid"]
    assert result.proto.graph.node[0].input == ["x"]


def test_identity_captured_by_an_if_branch_is_rewired_inside_the_branch():
    text = HEADER + """
    g (float[3] x, bool condition) => (float[3] y) {
      copy = Identity(x)
      y = If(condition) <
        then_branch = then_graph () => (float[3] then_out) { then_out = Add(copy, copy) },
        else_branch = else_graph () => (float[3] else_out) { else_out = Neg(copy) }
      >
    }
    """
    for condition in (True, False):
        feeds = {"x": np.array([1.0, -2.0, 3.5], np.float32), "condition": np.array(condition)}
        result = check_pass(text, EliminateIdentity(), feeds=feeds)
    assert op_types(result.model) == ["If"]
    if_node = next(iter(result.model.graph))
    x = result.model.graph.inputs[0]
    for branch in ("then_branch", "else_branch"):
        inner = next(iter(if_node.attributes[branch].as_graph()))
        assert all(value is x for value in inner.inputs)
    assert "copy" not in str(result.proto)


def test_identity_captured_by_a_loop_body_is_rewired_inside_the_body():
    text = HEADER + """
    g (float[2] x) => (float[2] y) {
      step = Identity(x)
      trips = Constant<value_int = 3>()
      keep_going = Constant<value = bool {1}>()
      start = Constant<value_floats = [0.0, 0.0]>()
      y = Loop(trips, keep_going, start) <
        body = loop_body (int64 iteration, bool condition_in, float[2] total_in)
            => (bool condition_out, float[2] total_out) {
          condition_out = Identity(condition_in)
          total_out = Add(total_in, step)
        }
      >
    }
    """
    result = check_pass(text, EliminateIdentity())
    assert op_types(result.model) == ["Constant", "Constant", "Constant", "Loop"]
    loop = list(result.model.graph)[-1]
    body = loop.attributes["body"].as_graph()
    # The Identity in the body reads a body input and feeds a body output: it stays; the captured one is gone.
    assert [node.op_type for node in body] == ["Identity", "Add"]
    assert list(body)[1].inputs[1] is result.model.graph.inputs[0]


def test_identity_of_an_outer_value_feeding_a_branch_output_is_kept():
    text = if_model_text("2", "r = Relu(x)", "then_out = Identity(r)", "else_out = Neg(r)")
    result = check_pass(text, EliminateIdentity(), expect_modified=False, feeds={
        "x": np.array([1.0, -1.0], np.float32), "condition": np.array(True)})
    then_graph = list(result.model.graph)[1].attributes["then_branch"].as_graph()
    assert [node.op_type for node in then_graph] == ["Identity"]


DROPOUT_13 = HEADER.replace("17", "13")


@pytest.mark.parametrize(
    "body, initializers",
    [
        ("y = Dropout(x)", ""),
        ("y = Dropout<seed = 3>(x, ratio)", "<float ratio = {0.5}>"),
        ("y = Dropout(x, ratio, training)", "<float ratio = {0.5}, bool training = {0}>"),
        ("y, mask = Dropout(x)", ""),
    ],
    ids=["no-training-input", "ratio-only", "training-false", "unused-mask"],
)
def test_inference_dropout_is_removed(body, initializers):
    text = DROPOUT_13 + f"""
    g (float[4] x) => (float[4] z) {initializers} {{
      {body}
      z = Relu(y)
    }}
    """
    result = check_pass(text, EliminateIdentity())
    assert op_types(result.model) == ["Relu"]


def test_dropout_whose_mask_is_read_is_kept():
    text = DROPOUT_13 + """
    g (float[4] x) => (float[4] z, bool[4] mask) {
      y, mask = Dropout(x)
      z = Relu(y)
    }
    """
    result = check_pass(text, EliminateIdentity(), expect_modified=False)
    assert op_types(result.model) == ["Dropout", "Relu"]


def test_dropout_with_a_training_switch_from_the_caller_is_kept():
    text = DROPOUT_13 + """
    g (float[4] x, bool training) => (float[4] z) <float ratio = {0.0}> {
      y = Dropout(x, ratio, training)
      z = Relu(y)
    }
    """
    # ratio 0 keeps the output deterministic even in training mode.
    result = check_pass(text, EliminateIdentity(), expect_modified=False)
    assert op_types(result.model) == ["Dropout", "Relu"]


@pytest.mark.parametrize("is_test, removed", [(None, False), (0, False), (1, True)])
def test_opset_6_dropout_is_removed_only_in_test_mode(is_test, removed):
    attribute = "" if is_test is None else f"<is_test = {is_test}>"
    model = to_ir(f"""
    <ir_version: 3, opset_import: ["" : 6]>
    g (float[4] x) => (float[4] z) {{
      y = Dropout{attribute}(x)
      z = Relu(y)
    }}
    """)
    assert EliminateIdentity()(model).modified == removed
    assert ("Dropout" in op_types(model)) != removed


def test_cast_to_the_same_type_is_removed_and_a_real_cast_is_kept():
    text = HEADER + """
    g (float[3] x) => (double[3] y) {
      same = Cast<to = 1>(x)
      r = Relu(same)
      y = Cast<to = 11>(r)
    }
    """
    result = check_pass(text, EliminateIdentity())
    assert op_types(result.model) == ["Relu", "Cast"]


def test_reshape_to_the_same_static_shape_is_removed():
    text = HEADER + """
    g (float[2,3,4] x) => (float[2,3,4] y, float[6,4] z) <int64[3] same = {0, 3, -1}, int64[2] other = {6, 4}> {
      a = Reshape(x, same)
      y = Relu(a)
      z = Reshape(x, other)
    }
    """
    result = check_pass(text, EliminateIdentity())
    assert op_types(result.model) == ["Relu", "Reshape"]


def test_expand_and_squeeze_are_not_treated_as_no_ops():
    text = HEADER + """
    g (float[1,3] x) => (float[1,3] y, float[3] z) <int64[2] shape = {1, 3}, int64[1] axes = {0}> {
      y = Expand(x, shape)
      z = Squeeze(x, axes)
    }
    """
    result = check_pass(text, EliminateIdentity(), expect_modified=False)
    assert op_types(result.model) == ["Expand", "Squeeze"]


def test_resolved_reshape_follows_zero_and_minus_one_rules():
    assert resolved_reshape((2, 3, 4), np.array([0, -1]), allow_zero=False) == (2, 12)
    assert resolved_reshape((2, 3, 4), np.array([2, 3, 4]), allow_zero=False) == (2, 3, 4)
    assert resolved_reshape((2, 0), np.array([0, 2]), allow_zero=True) == (0, 2)
    assert resolved_reshape((2, 3), np.array([-1, -1]), allow_zero=False) is None

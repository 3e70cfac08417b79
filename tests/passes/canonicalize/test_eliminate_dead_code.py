"""EliminateDeadCode: unread nodes and initializers go, in one run, in subgraphs and functions too."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from qgraph.testing import TEXT_HEADER as HEADER
from qgraph.testing import check_pass, function_model_text, if_model_text, op_types, to_ir


def test_dead_chain_and_its_initializers_are_removed_in_one_run():
    text = HEADER + """
    g (float[3] x) => (float[3] y) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {4.0, 5.0, 6.0}> {
      first = Mul(x, a)
      second = Add(first, b)
      third = Relu(second)
      y = Neg(x)
    }
    """
    result = check_pass(text, EliminateDeadCode())
    assert op_types(result.model) == ["Neg"]
    assert len(result.model.graph.initializers) == 0


def test_graph_outputs_keep_their_producers_and_initializers():
    text = HEADER + """
    g (float[3] x) => (float[3] y, float[3] w, float[3] z)
      <float[3] w = {1.0, 2.0, 3.0}, float[3] unread = {0.0, 0.0, 0.0}> {
      y = Relu(x)
      z = Mul(x, w)
    }
    """
    result = check_pass(text, EliminateDeadCode())
    assert op_types(result.model) == ["Relu", "Mul"]
    assert set(result.model.graph.initializers) == {"w"}


def test_initializer_that_is_a_graph_input_is_kept():
    text = HEADER + """
    g (float[3] x, float[3] default) => (float[3] y) <float[3] default = {1.0, 2.0, 3.0}> {
      y = Relu(x)
    }
    """
    result = check_pass(text, EliminateDeadCode(), expect_modified=False)
    assert set(result.model.graph.initializers) == {"default"}


def test_node_with_one_read_output_is_kept():
    text = HEADER + """
    g (float[4] x) => (float[4] y) <int64[1] k = {2}> {
      values, indices = TopK(x, k)
      padded = Concat<axis = 0>(values, values)
      y = Neg(padded)
    }
    """
    result = check_pass(text, EliminateDeadCode(), expect_modified=False)
    assert op_types(result.model) == ["TopK", "Concat", "Neg"]


def test_dead_nodes_inside_branches_release_their_captures():
    text = HEADER + """
    g (float[3] x, bool condition) => (float[3] y) <float[3] captured_weight = {1.0, 2.0, 3.0}> {
      only_read_by_dead_code = Exp(x)
      y = If(condition) <
        then_branch = then_graph () => (float[3] then_out) <float[3] unread_inner = {0.0, 0.0, 0.0}> {
          dead = Mul(only_read_by_dead_code, captured_weight)
          then_out = Relu(x)
        },
        else_branch = else_graph () => (float[3] else_out) { else_out = Neg(x) }
      >
    }
    """
    for condition in (True, False):
        feeds = {"x": np.array([1.0, -2.0, 3.0], np.float32), "condition": np.array(condition)}
        result = check_pass(text, EliminateDeadCode(), feeds=feeds)
    assert op_types(result.model) == ["If"]
    assert len(result.model.graph.initializers) == 0
    then_graph = next(iter(result.model.graph)).attributes["then_branch"].as_graph()
    assert [node.op_type for node in then_graph] == ["Relu"]
    assert len(then_graph.initializers) == 0


def test_value_read_by_a_live_branch_is_kept():
    text = if_model_text("3", "shifted = Exp(x)", "then_out = Relu(shifted)", "else_out = Neg(x)")
    result = check_pass(text, EliminateDeadCode(), expect_modified=False,
                        feeds={"x": np.ones(3, np.float32), "condition": np.array(True)})
    assert op_types(result.model) == ["Exp", "If"]


def test_dead_loop_and_everything_only_it_captured_are_removed():
    text = HEADER + """
    g (float[2] x) => (float[2] y) <int64 trips = {3}, bool keep_going = {1}> {
      step = Exp(x)
      unused = Loop(trips, keep_going, x) <
        body = loop_body (int64 iteration, bool condition_in, float[2] total_in)
            => (bool condition_out, float[2] total_out) {
          condition_out = Identity(condition_in)
          total_out = Add(total_in, step)
        }
      >
      y = Neg(x)
    }
    """
    result = check_pass(text, EliminateDeadCode())
    assert op_types(result.model) == ["Neg"]
    assert len(result.model.graph.initializers) == 0


def test_dead_nodes_inside_functions_are_removed():
    text = function_model_text("y = local.Double(x)", "Double", "wasted = Exp(input)\n output = Add(input, input)")
    result = check_pass(text, EliminateDeadCode())
    function = next(iter(result.model.functions.values()))
    assert [node.op_type for node in function] == ["Add"]


def _custom_model(domain: str) -> ir.Model:
    return to_ir(f"""
    <ir_version: 8, opset_import: ["" : 17, "{domain}" : 1]>
    g (float[2] x) => (float[2] y) {{
      logged = {domain}.Log(x)
      y = Neg(x)
    }}
    """)


def test_unread_custom_operators_are_kept_unless_their_domain_is_declared_pure():
    model = _custom_model("my.custom")
    assert not EliminateDeadCode()(model).modified
    assert op_types(model) == ["Log", "Neg"]
    model = _custom_model("my.custom")
    assert EliminateDeadCode(pure_domains=["my.custom"])(model).modified
    assert op_types(model) == ["Neg"]


def test_unread_calls_of_pure_local_functions_are_removed():
    text = function_model_text("unread = local.Double(x)\n y = Neg(x)", "Double", "output = Add(input, input)")
    result = check_pass(text, EliminateDeadCode())
    assert op_types(result.model) == ["Neg"]


def test_a_graph_out_of_topological_order_is_still_cleaned_in_one_run():
    model = to_ir(HEADER + """
    g (float[2] x) => (float[2] y) {
      a = Exp(x)
      b = Relu(a)
      y = Neg(x)
    }
    """)
    exp, relu, neg = list(model.graph)
    model.graph.remove([exp, relu])
    model.graph.insert_after(neg, [relu, exp])  # Relu now comes before the Exp it reads
    assert EliminateDeadCode()(model).modified
    assert op_types(model) == ["Neg"]

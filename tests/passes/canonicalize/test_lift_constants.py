"""LiftConstants: Constant nodes become initializers of the graph that owns them, under the same name."""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qgraph.passes.canonicalize.lift_constants import LiftConstants
from qgraph.testing import check_pass, function_model_text, op_types, run_model, to_ir


def test_every_dense_attribute_kind_becomes_an_initializer():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y, int64[2] shape, int64 count, float scale) {
      weight = Constant<value = float[3] {1.0, 2.0, 3.0}>()
      bias = Constant<value_floats = [0.5, 0.25, 0.125]>()
      scale = Constant<value_float = 2.0>()
      shape = Constant<value_ints = [1, 3]>()
      count = Constant<value_int = 3>()
      product = Mul(x, weight)
      scaled = Mul(product, scale)
      y = Add(scaled, bias)
    }
    """
    result = check_pass(text, LiftConstants())
    assert op_types(result.model) == ["Mul", "Mul", "Add"]
    initializers = result.model.graph.initializers
    assert set(initializers) == {"weight", "bias", "scale", "shape", "count"}
    assert initializers["scale"].const_value.dtype == ir.DataType.FLOAT and initializers["scale"].shape == ()
    assert initializers["count"].const_value.dtype == ir.DataType.INT64 and initializers["count"].shape == ()
    np.testing.assert_array_equal(initializers["shape"].const_value.numpy(), [1, 3])
    # Constants that were graph outputs are initializer outputs now, under the same names.
    assert [output.name for output in result.model.graph.outputs] == ["y", "shape", "count", "scale"]
    assert result.model.graph.outputs[1] is initializers["shape"]


def test_string_constants_are_lifted():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1] x) => (float[1] y, string word, string[2] words) {
      word = Constant<value_string = "hello">()
      words = Constant<value_strings = ["a", "bc"]>()
      y = Identity(x)
    }
    """
    proto = onnx.parser.parse_model(text)
    model = to_ir(proto)
    assert LiftConstants()(model).modified
    assert op_types(model) == ["Identity"]
    after = ir.serde.serialize_model(model)
    onnx.checker.check_model(after, full_check=True)
    feeds = {"x": np.ones(1, np.float32)}
    before, lifted = run_model(proto, feeds), run_model(after, feeds)
    for name in ("word", "words"):
        np.testing.assert_array_equal(lifted[name], before[name])


def test_constant_inside_if_branch_becomes_an_initializer_of_the_branch():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool condition) => (float[2] y) {
      outer = Constant<value_floats = [3.0, 4.0]>()
      y = If(condition) <
        then_branch = then_graph () => (float[2] then_out) {
          inner = Constant<value_floats = [1.0, 2.0]>()
          then_out = Add(x, inner)
        },
        else_branch = else_graph () => (float[2] else_out) {
          else_out = Mul(x, outer)
        }
      >
    }
    """
    for condition in (True, False):
        feeds = {"x": np.array([1.5, -2.0], np.float32), "condition": np.array(condition)}
        result = check_pass(text, LiftConstants(), feeds=feeds)
    assert op_types(result.model) == ["If"]
    assert set(result.model.graph.initializers) == {"outer"}
    if_node = next(iter(result.model.graph))
    then_graph = if_node.attributes["then_branch"].as_graph()
    assert set(then_graph.initializers) == {"inner"}
    assert [node.op_type for node in then_graph] == ["Add"]
    # The else branch still captures the outer value, now an initializer of the main graph.
    else_node = next(iter(if_node.attributes["else_branch"].as_graph()))
    assert else_node.inputs[1] is result.model.graph.initializers["outer"]


def test_constant_that_is_a_branch_output_is_lifted():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool condition) => (float[2] y) {
      y = If(condition) <
        then_branch = then_graph () => (float[2] then_out) { then_out = Constant<value_floats = [1.0, 2.0]>() },
        else_branch = else_graph () => (float[2] else_out) { else_out = Constant<value_floats = [5.0, 6.0]>() }
      >
    }
    """
    for condition in (True, False):
        check_pass(text, LiftConstants(), feeds={"condition": np.array(condition)})


def test_shared_constant_is_lifted_once_for_every_reader():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      weight = Constant<value_floats = [1.0, 2.0]>()
      first = Mul(x, weight)
      second = Add(first, weight)
      y = Sub(second, weight)
    }
    """
    result = check_pass(text, LiftConstants())
    weight = result.model.graph.initializers["weight"]
    assert len(weight.uses()) == 3


def test_constants_in_functions_are_left_alone():
    text = function_model_text("y = local.AddOne(x)", "AddOne",
                               "one = Constant<value_float = 1.0>()\n output = Add(input, one)")
    result = check_pass(text, LiftConstants(), expect_modified=False)
    function = next(iter(result.model.functions.values()))
    assert [node.op_type for node in function] == ["Constant", "Add"]


def test_sparse_constant_is_refused_with_a_reason(caplog):
    # onnx-ir cannot deserialize a sparse attribute from a proto yet, so the node is built in the IR directly.
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]))
    sparse = ir.Attr("sparse_value", ir.AttributeType.SPARSE_TENSOR, None)
    constant = ir.Node("", "Constant", [], attributes=[sparse], name="sparse_weight")
    constant.outputs[0].name = "weight"
    add = ir.Node("", "Add", [x, constant.outputs[0]], name="add")
    add.outputs[0].name = "y"
    graph = ir.Graph([x], [add.outputs[0]], nodes=[constant, add], opset_imports={"": 17})
    model = ir.Model(graph, ir_version=8)
    with caplog.at_level(logging.INFO, logger="qgraph.passes.canonicalize.lift_constants"):
        assert not LiftConstants()(model).modified
    assert op_types(model) == ["Constant", "Add"]
    assert "sparse_weight" in caplog.text and "sparse" in caplog.text


def test_thousands_of_constants_lift_in_linear_time():
    count = 2000
    nodes, previous = [], "x"
    for index in range(count):
        nodes.append(helper.make_node("Constant", [], [f"c{index}"], value=numpy_helper.from_array(
            np.full(4, index, np.float32), f"c{index}")))
        nodes.append(helper.make_node("Add", [previous, f"c{index}"], [f"a{index}"]))
        previous = f"a{index}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes, "many",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = to_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    start = time.perf_counter()
    assert LiftConstants()(model).modified
    elapsed = time.perf_counter() - start
    assert len(model.graph.initializers) == count
    assert "Constant" not in op_types(model)
    assert elapsed < 2.0, f"lifting {count} constants took {elapsed:.2f}s"
    feeds = {"x": np.zeros(4, np.float32)}
    expected = np.full(4, count * (count - 1) / 2, np.float32)
    np.testing.assert_allclose(run_model(model, feeds)["y"], expected)

"""qgraph.ir.values: the one answer to "constant?", "sole consumer?", "which operator?", "which opset?"."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph.ir import values

MODEL = """
<ir_version: 10, opset_import: ["" : 17, "local" : 1]>
main (float[2] x, float[N] default) => (float[2] y, float[2] out)
    <float[2] w = {1.0, 2.0}, float[2] default = {3.0, 4.0}> {
    c = Constant <value = float[2] {5.0, 6.0}> ()
    a = Add(x, w)
    out = Relu(a)
    m = Mul(a, a)
    s = Sub(m, c)
    t = Add(s, default)
    unread = Neg(t)
    y = local.f(t)
}
<domain: "local", opset_import: ["" : 13]>
f (p) => (q) {
    q = Relu(p)
}
"""


@pytest.fixture
def model() -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(MODEL))


def named(model: ir.Model) -> dict[str, ir.Value]:
    found = {value.name: value for value in model.graph.inputs}
    found.update(model.graph.initializers)
    for node in model.graph:
        found.update((output.name, output) for output in node.outputs)
    return found


def node_of(model: ir.Model, op_type: str) -> ir.Node:
    return next(node for node in model.graph if node.op_type == op_type)


def test_an_initializer_that_is_no_graph_input_is_a_constant(model):
    w = named(model)["w"]
    assert values.is_constant(w)
    np.testing.assert_array_equal(values.constant_array(w), np.array([1.0, 2.0], np.float32))
    assert values.constant_refusal(w, "the weight") is None


def test_a_graph_input_with_a_default_is_not_a_constant(model):
    default = named(model)["default"]
    assert default.is_initializer() and default.is_graph_input()
    assert not values.is_constant(default)
    assert values.constant_array(default) is None
    assert values.constant_refusal(default, "the bias") == (
        "the bias 'default' is a graph input (a caller can override it)"
    )


def test_a_constant_node_output_and_an_activation_are_not_constants(model):
    constant_output, activation = named(model)["c"], named(model)["a"]
    assert values.constant_array(constant_output) is None
    assert values.constant_refusal(constant_output, "the operand") == "the operand 'c' is not a constant initializer"
    assert values.constant_array(activation) is None
    # even with its tensor recorded (as a rewrite inside a function records it), a node's output is no constant
    constant_output.const_value = ir.tensor(np.array([5.0, 6.0], np.float32))
    assert not values.is_constant(constant_output)
    assert values.constant_refusal(None, "the zero point") == "the zero point is missing"
    assert not values.is_constant(None) and values.constant_array(None) is None


def test_static_shape_is_the_declared_shape_else_a_constants_data(model):
    by_name = named(model)
    assert values.static_shape(by_name["x"]) == (2,)
    assert values.static_shape(None) is None
    w = by_name["w"]
    w.shape = ir.Shape(["K"])  # a symbolic declared shape: the data tells
    assert values.static_shape(w) == (2,)
    # a graph input's default does not fix what a caller feeds: float[N] stays unknown
    assert values.static_shape(by_name["default"]) is None
    assert values.static_shape(by_name["c"]) is None  # no declared shape, and no constant


def test_sole_consumer_is_the_only_use_of_a_value_that_is_no_graph_output(model):
    by_name = named(model)
    assert values.sole_consumer(by_name["m"]) is node_of(model, "Sub")
    assert values.sole_consumer(by_name["s"]) is by_name["t"].producer()
    assert values.sole_consumer_refusal(by_name["m"], "the product") is None
    assert values.sole_consumer_refusal(by_name["m"], "the product", node_of(model, "Sub")) is None


def test_fan_out_and_a_node_reading_a_value_twice_have_no_sole_consumer(model):
    by_name = named(model)
    # a: read by Relu and twice by Mul
    assert values.sole_consumer(by_name["a"]) is None
    assert values.sole_consumer_refusal(by_name["a"], "the sum") == (
        "the sum 'a' is read by Mul '' (2 inputs), Relu '' (fan-out)"
    )
    # Mul(a, a) alone still makes two uses: rewiring "its" input would leave the other behind
    node_of(model, "Relu").replace_input_with(0, by_name["x"])
    assert values.sole_consumer(by_name["a"]) is None
    assert values.sole_consumer_refusal(by_name["a"], "the sum") == "the sum 'a' is read by Mul '' (2 inputs) (fan-out)"
    # t: read by Neg and by the function call
    assert values.sole_consumer(by_name["t"]) is None


def test_a_graph_output_or_an_unread_value_has_no_sole_consumer(model):
    by_name = named(model)
    out = by_name["out"]
    assert out.is_graph_output() and values.sole_consumer(out) is None
    assert values.sole_consumer_refusal(out, "the output") == "the output 'out' is a graph output"
    # a graph output with one reader is still refused: the reader would not be the only one who sees it
    reader = ir.node("Neg", [out])
    model.graph.append(reader)
    assert values.sole_consumer(out) is None
    unread = by_name["unread"]
    assert values.sole_consumer(unread) is None
    assert values.sole_consumer_refusal(unread, "the negation") == "the negation 'unread' is never read"


def test_sole_consumer_refusal_names_the_wrong_consumer(model):
    m = named(model)["m"]
    refusal = values.sole_consumer_refusal(m, "the product", node_of(model, "Relu"))
    assert refusal == "the product 'm' is read by Sub '', not by the expected node"


def test_is_op_compares_type_and_domain(model):
    add = node_of(model, "Add")
    assert values.is_op(add, "Add")
    assert values.is_op(add, "Mul", "Add")
    assert values.is_op(add, "Add", domain="ai.onnx")  # the default domain's alias
    assert not values.is_op(add, "Add", domain="com.microsoft")
    assert not values.is_op(add, "Sub")
    assert not values.is_op(None, "Add")
    call = node_of(model, "f")
    assert values.is_op(call, "f", domain="local") and not values.is_op(call, "f")
    gelu = ir.Node("com.microsoft", "Gelu", [])
    assert values.is_op(gelu, "Gelu", domain=values.MICROSOFT_DOMAIN) and not values.is_op(gelu, "Gelu")


def test_default_opset_of_an_ir_model_and_of_a_proto(model):
    assert values.default_opset(model) == 17
    assert values.default_opset(ir.serde.serialize_model(model)) == 17


@pytest.mark.parametrize("domain, version, expected", [
    ("ai.onnx", 13, 13),  # "ai.onnx" is the default domain
    ("com.microsoft", 1, 0),  # a model importing no default domain has opset 0
])
def test_default_opset_of_a_model_importing_one_domain(domain, version, expected):
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []),
                                   opset_imports=[onnx.helper.make_opsetid(domain, version)])
    assert values.default_opset(proto) == expected
    bare = ir.Model(ir.Graph([], [], nodes=[], opset_imports={domain: version}), ir_version=10)
    assert values.default_opset(bare) == expected


def test_a_node_in_a_function_uses_the_functions_opset(model):
    function = next(iter(model.functions.values()))
    inner = next(iter(function))
    assert values.node_default_opset(inner, model) == 13
    assert values.node_default_opset(node_of(model, "Add"), model) == 17
    function.opset_imports.pop("")
    assert values.node_default_opset(inner, model) == 17  # the model's, when the function imports none


def test_ensure_microsoft_domain_imports_it_once_and_into_a_function(model):
    function = next(iter(model.functions.values()))
    values.ensure_microsoft_domain(model)
    assert model.opset_imports[values.MICROSOFT_DOMAIN] == 1
    assert values.MICROSOFT_DOMAIN not in function.opset_imports
    model.opset_imports[values.MICROSOFT_DOMAIN] = 2
    values.ensure_microsoft_domain(model, next(iter(function)).graph)
    assert model.opset_imports[values.MICROSOFT_DOMAIN] == 2  # an existing import keeps its version
    assert function.opset_imports[values.MICROSOFT_DOMAIN] == 1

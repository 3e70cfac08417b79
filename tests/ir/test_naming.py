"""qgraph.ir.naming: one fresh-name scheme, checked against every name of the model, subgraphs and functions too."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from qgraph.ir.naming import (
    NameScope,
    names_in_graph,
    names_in_model,
    names_in_proto,
    new_output_name,
)
from qgraph.ir.subgraphs import make_names_unique

MODEL = """
<ir_version: 10, opset_import: ["" : 17, "local" : 1]>
main (bool cond, float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> {
    a = Add(x, w)
    y = If(cond) <
        then_branch = then_graph () => (float[2] inner) { inner = Relu(a) },
        else_branch = else_graph () => (float[2] other) { other = local.f(a) }
    >
}
<domain: "local", opset_import: ["" : 13]>
f (p) => (q) {
    hidden = Neg(p)
    q = Relu(hidden)
}
"""


def load() -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(MODEL))


def test_the_model_scope_holds_every_graphs_names():
    model = load()
    names = names_in_model(model)
    # main graph inputs, initializers, node outputs; both branches; the function's inputs and inner values
    assert {"cond", "x", "w", "a", "y", "inner", "other", "p", "hidden", "q"} <= names
    model.graph[0].name = "the_add"
    assert "the_add" not in names_in_model(model)
    assert "the_add" in names_in_model(model, node_names=True)


def test_a_body_defines_its_own_names_not_the_ones_it_captures():
    model = load()
    then_branch = model.graph[1].attributes["then_branch"].as_graph()
    assert names_in_graph(then_branch) == {"inner"}  # it reads "a", which the main graph defines


def test_fresh_names_avoid_subgraph_and_function_names_and_never_repeat():
    scope = NameScope(load())
    assert scope.fresh("inner") == "inner_1"  # taken in the then branch only: still taken
    assert scope.fresh("hidden") == "hidden_1"  # taken inside the function
    assert scope.fresh("inner") == "inner_2"  # a handed-out name joins the scope
    assert scope.fresh("new") == "new"
    assert scope.fresh("new") == "new_1"
    assert scope.fresh("") == "qgraph"
    assert "inner_2" in scope and "unheard_of" not in scope


def test_a_model_scope_reads_the_model_at_its_first_request():
    model = load()
    scope = NameScope(model)
    model.graph.append(ir.node("Neg", [model.graph.inputs[1]], name="late"))
    model.graph[-1].outputs[0].name = "late_output"
    assert scope.fresh("late_output") == "late_output_1"


def test_a_scope_of_given_names_and_reserved_names():
    scope = NameScope.of_names({"a", "a_1"})
    assert scope.fresh("a") == "a_2"
    scope.reserve(["b", None, ""])
    assert scope.fresh("b") == "b_1"
    assert NameScope().fresh("a") == "a"


def test_a_proto_scope_sees_the_same_names_as_the_model_scope():
    model = load()
    proto = ir.serde.serialize_model(model)
    assert names_in_proto(proto) == names_in_model(model)
    assert NameScope.of_proto(proto).fresh("hidden") == "hidden_1"
    proto.graph.node[0].name = "the_add"
    assert "the_add" in names_in_proto(proto, node_names=True) and "the_add" not in names_in_proto(proto)


def test_new_output_name_names_every_output_freshly():
    model = load()
    scope = NameScope(model)
    node = ir.Node("", "Split", [model.graph.inputs[1]], num_outputs=3)
    new_output_name(scope, node, "a")
    assert [output.name for output in node.outputs] == ["a_1", "a_1_1", "a_2"]


def test_make_names_unique_renames_sibling_branch_names_only():
    model = ir.serde.deserialize_model(onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 17]>
        main (bool cond, float[2] x) => (float[2] y) {
            shared = Relu(x)
            y = If(cond) <
                then_branch = g1 () => (float[2] twin) { twin = Neg(shared) },
                else_branch = g2 () => (float[2] twin) { twin = Abs(shared) }
            >
        }
    """))
    then_branch = model.graph[1].attributes["then_branch"].as_graph()
    else_branch = model.graph[1].attributes["else_branch"].as_graph()
    assert make_names_unique(model) == 1
    assert then_branch.outputs[0].name == "twin"
    assert else_branch.outputs[0].name == "twin_1"
    assert model.graph[0].outputs[0].name == "shared"  # main-graph names never change
    assert make_names_unique(model) == 0

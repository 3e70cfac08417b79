"""networkx views of onnx-ir graphs: edges follow values, helpers answer order, dominance and grouping questions."""

from __future__ import annotations

import networkx as nx
import onnx
import onnx_ir as ir

from qgraph.ir import analysis
from qgraph.testing import to_ir

DIAMOND = """
<ir_version: 10, opset_import: ["" : 17]>
diamond (float[1, 4] x) => (float[1, 4] y) {
    a = Relu(x)
    b = Sigmoid(a)
    c = Tanh(a)
    d = Add(b, c)
    y = Mul(d, a)
}
"""


def by_op(model: ir.Model) -> dict[str, ir.Node]:
    return {node.op_type: node for node in model.graph}


def test_edges_follow_values_and_carry_them():
    model = to_ir(DIAMOND)
    nodes = by_op(model)
    view = analysis.dataflow_graph(model.graph)
    assert isinstance(view, nx.DiGraph)
    assert set(view.nodes) == set(model.graph)
    assert set(view.edges) == {
        (nodes["Relu"], nodes["Sigmoid"]),
        (nodes["Relu"], nodes["Tanh"]),
        (nodes["Relu"], nodes["Mul"]),
        (nodes["Sigmoid"], nodes["Add"]),
        (nodes["Tanh"], nodes["Add"]),
        (nodes["Add"], nodes["Mul"]),
    }
    edge = view.edges[nodes["Relu"], nodes["Mul"]]
    assert edge["value"] is nodes["Relu"].outputs[0]
    assert edge["values"] == (nodes["Relu"].outputs[0],)
    assert view.nodes[nodes["Add"]]["index"] == 3


def test_one_edge_for_a_value_read_twice():
    model = to_ir(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        twice (float[2] x) => (float[2] y) {
            a = Relu(x)
            y = Mul(a, a)
        }
        """
    )
    view = analysis.dataflow_graph(model.graph)
    assert view.number_of_edges() == 1
    (producer, consumer, data), = view.edges(data=True)
    assert data["values"] == (producer.outputs[0],)


def test_view_is_a_snapshot_built_fresh():
    model = to_ir(DIAMOND)
    before = analysis.dataflow_graph(model.graph)
    nodes = by_op(model)
    # Rewire Mul to read Sigmoid instead of Add, then drop Add and Tanh.
    nodes["Mul"].replace_input_with(0, nodes["Sigmoid"].outputs[0])
    model.graph.remove([nodes["Add"], nodes["Tanh"]], safe=True)
    assert nodes["Add"] in before  # the old view did not change
    after = analysis.dataflow_graph(model.graph)
    assert nodes["Add"] not in after
    assert (nodes["Sigmoid"], nodes["Mul"]) in after.edges


def test_topological_order_check():
    model = to_ir(DIAMOND)
    assert analysis.is_topologically_sorted(model.graph)
    nodes = by_op(model)
    model.graph.remove(nodes["Relu"])
    model.graph.append(nodes["Relu"])  # now the producer comes last
    assert not analysis.is_topologically_sorted(model.graph)
    model.graph.sort()
    assert analysis.is_topologically_sorted(model.graph)


def test_dominators_of_a_diamond():
    model = to_ir(DIAMOND)
    nodes = by_op(model)
    idom = analysis.dominators(model.graph, nodes["Relu"])
    assert idom[nodes["Sigmoid"]] is nodes["Relu"]
    assert idom[nodes["Tanh"]] is nodes["Relu"]
    assert idom[nodes["Add"]] is nodes["Relu"]  # two paths join: neither branch dominates
    assert idom[nodes["Mul"]] is nodes["Relu"]
    idom_from_sigmoid = analysis.dominators(model.graph, nodes["Sigmoid"])
    assert set(idom_from_sigmoid) == {nodes["Sigmoid"], nodes["Add"], nodes["Mul"]}
    assert idom_from_sigmoid[nodes["Mul"]] is nodes["Add"]


def test_connected_groups_by_edge_predicate():
    model = to_ir(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        groups (float[1, 2, 4, 4] x, float[1, 2, 4, 4] z) => (float[1, 4, 4, 4] y, float[1, 2, 2, 2] w) {
            a = Relu(x)
            b = Relu(z)
            y = Concat <axis = 1> (a, b)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (z)
            w = Sigmoid(p)
        }
        """
    )
    nodes = list(model.graph)
    relu_a, relu_b, concat, pool, sigmoid = nodes
    into_concat = analysis.connected_groups(model.graph, lambda producer, consumer, value: consumer.op_type == "Concat")
    assert into_concat == [[relu_a, relu_b, concat]]
    everything = analysis.connected_groups(model.graph, lambda producer, consumer, value: True)
    assert everything == [[relu_a, relu_b, concat], [pool, sigmoid]]
    assert analysis.connected_groups(model.graph, lambda producer, consumer, value: False) == []


def test_values_read_inside_a_subgraph_link_to_the_owning_node():
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["a"], ["then_out"])], "then", [],
        [onnx.helper.make_tensor_value_info("then_out", onnx.TensorProto.FLOAT, [2])],
    )
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Neg", ["a"], ["else_out"])], "else", [],
        [onnx.helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, [2])],
    )
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Sigmoid", ["x"], ["a"]),
            onnx.helper.make_node("If", ["condition"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        "with_if",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
            onnx.helper.make_tensor_value_info("condition", onnx.TensorProto.BOOL, []),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    sigmoid, if_node = list(model.graph)
    view = analysis.dataflow_graph(model.graph)
    assert view.has_edge(sigmoid, if_node)
    assert view.edges[sigmoid, if_node]["value"] is sigmoid.outputs[0]
    assert analysis.is_topologically_sorted(model.graph)

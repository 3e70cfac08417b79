"""qgraph.ir.edit: new initializers under fresh names, unused ones dropped (the interface kept), captures released."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer, release_captures
from qgraph.ir.naming import NameScope

MODEL = """
<ir_version: 10, opset_import: ["" : 17]>
main (bool cond, float[2] x, float[2] default) => (float[2] y, float[2] kept_output)
    <float[2] w = {1.0, 2.0}, float[2] unused = {0.0, 0.0}, float[2] default = {3.0, 4.0},
     float[2] kept_output = {5.0, 6.0}> {
    a = Add(x, w)
    y = If(cond) <
        then_branch = g1 () => (float[2] t) { t = Mul(a, w) },
        else_branch = g2 () => (float[2] e) { e = Neg(a) }
    >
}
"""


def load() -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(MODEL))


def test_new_initializer_takes_a_fresh_model_wide_name_and_keeps_scalars_scalar():
    model = load()
    names = NameScope(model)
    value = new_initializer(model.graph, names, "t", np.float32(2.5))  # "t" is taken inside the then branch
    assert value.name == "t_1"
    assert model.graph.initializers["t_1"] is value
    assert value.shape == ir.Shape([]) and value.dtype == ir.DataType.FLOAT
    np.testing.assert_array_equal(value.const_value.numpy(), np.array(2.5, np.float32))
    second = new_initializer(model.graph, names, "t", np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2])
    assert second.name == "t_2" and second.shape == ir.Shape([2, 2]) and second.dtype == ir.DataType.INT64
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_drop_unused_initializers_keeps_graph_inputs_outputs_and_read_ones():
    model = load()
    initializers = model.graph.initializers
    assert drop_unused_initializers(initializers.values()) == 1
    assert set(initializers) == {"w", "default", "kept_output"}  # "unused" went; "default" is an input
    assert drop_unused_initializers(initializers.values()) == 0
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_drop_unused_initializers_of_detached_inputs_only_drops_what_nobody_reads():
    model = load()
    add = model.graph[0]
    w = model.graph.initializers["w"]
    add.replace_input_with(1, model.graph.inputs[1])
    # w is still read inside the then branch (a capture is a use)
    assert drop_unused_initializers([None, add.inputs[0], w]) == 0
    assert "w" in model.graph.initializers
    then_branch = model.graph[1].attributes["then_branch"].as_graph()
    then_branch[0].replace_input_with(1, then_branch[0].inputs[0])
    assert drop_unused_initializers([w]) == 1
    assert "w" not in model.graph.initializers


def test_release_captures_lets_outer_values_forget_a_dead_body():
    model = load()
    a = model.graph[0].outputs[0]
    w = model.graph.initializers["w"]
    assert len(a.uses()) == 2 and len(w.uses()) == 2  # the If's branches read a; the then branch and Add read w
    release_captures(model.graph[1].attributes["then_branch"].as_graph())
    assert len(a.uses()) == 1 and [use.node.op_type for use in w.uses()] == ["Add"]
    release_captures(model.graph[1].attributes["else_branch"].as_graph())
    assert a.uses() == ()

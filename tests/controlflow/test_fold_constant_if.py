"""FoldConstantIf: a constant condition (also one computed from a fixed input) inlines the taken branch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as onnxruntime_errors

from qgraph.ir.fix_inputs import fix_inputs
from qgraph.passes.canonicalize.fold_constant_if import FoldConstantIf
from qgraph.passes.canonicalize.fold_constants import FoldConstants
from qgraph.passes.infrastructure import PassManager
from qgraph.testing import check_pass, op_types
from tests.controlflow.models import FEATURES, SEQUENCE, speech_batches, speech_model


def _fixed(model: onnx.ModelProto, **values) -> onnx.ModelProto:
    """``model`` with inputs fixed and constants folded (the condition becomes an initializer)."""
    ir_model = fix_inputs(ir.serde.deserialize_model(model), values)
    PassManager([FoldConstants()]).run(ir_model)
    return ir.serde.serialize_model(ir_model)


def _feeds():
    return {"audio": speech_batches(1, batch=2)[0]["audio"]}


@pytest.mark.parametrize("sample_rate, kept", [(16000, "MatMul"), (8000, "Conv")])
def test_condition_from_a_fixed_sample_rate_inlines_the_taken_branch(sample_rate, kept):
    model = _fixed(speech_model(), sample_rate=sample_rate)
    assert "Greater" not in op_types(model) and "If" in op_types(model)
    checked = check_pass(model, FoldConstantIf(), feeds=_feeds())
    types = op_types(checked.proto)
    assert "If" not in types and kept in types
    assert ("Conv" in types) == (kept == "Conv")
    graph = checked.proto.graph
    assert [output.name for output in graph.output] == ["logits"]
    # the taken branch's initializers (and Constant nodes) moved into the main graph; the condition is gone
    names = {tensor.name for tensor in graph.initializer}
    assert ("then.weight" in names) == (kept == "MatMul") and "wide" not in names
    if kept == "Conv":
        assert "Constant" in types


def _if_model(then_graph, else_graph, condition: np.ndarray, outputs, inputs=None, nodes=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [*nodes, helper.make_node("If", ["condition"], [out.name for out in outputs], name="choice",
                                  then_branch=then_graph, else_branch=else_graph)],
        "if_model",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        outputs,
        [numpy_helper.from_array(condition, "condition")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _branch(name, nodes, outputs, initializers=()):
    return helper.make_graph(nodes, name, [], outputs, list(initializers))


def _out(name, shape=(2, 3)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def test_nested_ifs_fold_in_one_run():
    inner = _branch("inner_then", [helper.make_node("Mul", ["x", "two"], ["doubled"], name="double")],
                    [_out("doubled")], [numpy_helper.from_array(np.float32(2.0), "two")])
    inner_else = _branch("inner_else", [helper.make_node("Neg", ["x"], ["negated"], name="negate")],
                         [_out("negated")])
    outer_then = _branch(
        "outer_then",
        [helper.make_node("Not", ["flag"], ["not_flag"], name="invert"),
         helper.make_node("If", ["not_flag"], ["inner_result"], name="inner", then_branch=inner,
                          else_branch=inner_else),
         helper.make_node("Add", ["inner_result", "x"], ["outer_result"], name="add")],
        [_out("outer_result")],
        [numpy_helper.from_array(np.array(False), "flag")],
    )
    outer_else = _branch("outer_else", [helper.make_node("Identity", ["x"], ["same"], name="copy")], [_out("same")])
    model = _if_model(outer_then, outer_else, np.array(True), [_out("y")])
    # the inner condition is Not(flag): fold it first, as the canonical pipeline does
    folded = ir.serde.deserialize_model(model)
    PassManager([FoldConstants()]).run(folded)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    checked = check_pass(ir.serde.serialize_model(folded), FoldConstantIf(), feeds={"x": x})
    assert op_types(checked.proto) == ["Mul", "Add"]
    np.testing.assert_allclose(checked.outputs_after["y"], 3 * x)
    assert [output.name for output in checked.proto.graph.output] == ["y"]


def test_nested_if_inside_a_kept_if_folds_in_its_branch():
    """An outer If on a real input stays; the constant If inside its then-branch is inlined into that branch."""
    inner = _branch("inner_then", [helper.make_node("Relu", ["x"], ["relu"], name="relu")], [_out("relu")])
    inner_else = _branch("inner_else", [helper.make_node("Neg", ["x"], ["negated"], name="negate")],
                         [_out("negated")])
    outer_then = _branch(
        "outer_then",
        [helper.make_node("If", ["condition"], ["inner_result"], name="inner", then_branch=inner,
                          else_branch=inner_else)],
        [_out("inner_result")],
    )
    outer_else = _branch("outer_else", [helper.make_node("Abs", ["x"], ["absolute"], name="abs")], [_out("absolute")])
    graph = helper.make_graph(
        [helper.make_node("If", ["mode"], ["y"], name="outer", then_branch=outer_then, else_branch=outer_else)],
        "kept_outer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("mode", TensorProto.BOOL, [])],
        [_out("y")],
        [numpy_helper.from_array(np.array(True), "condition")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": np.arange(-3, 3, dtype=np.float32).reshape(2, 3)}
    for mode in (True, False):
        checked = check_pass(model, FoldConstantIf(), feeds={**feeds, "mode": np.array(mode)})
    assert op_types(checked.proto) == ["If"]
    then_branch = next(attribute.g for attribute in checked.proto.graph.node[0].attribute
                       if attribute.name == "then_branch")
    assert [node.op_type for node in then_branch.node] == ["Relu"]
    assert [output.name for output in then_branch.output] == ["inner_result"]  # the branch output keeps its name


def test_a_branch_that_returns_its_initializer_keeps_the_output_name():
    then_graph = _branch("then", [], [_out("c")], [numpy_helper.from_array(np.ones((2, 3), np.float32), "c")])
    else_graph = _branch("else", [helper.make_node("Neg", ["x"], ["negated"], name="negate")], [_out("negated")])
    model = _if_model(then_graph, else_graph, np.array(True), [_out("y")])
    checked = check_pass(model, FoldConstantIf())
    assert op_types(checked.proto) == ["Identity"]
    assert [output.name for output in checked.proto.graph.output] == ["y"]


def test_sibling_branches_may_share_names():
    """Both branches name their node ``step`` and their value ``t`` (each is its own scope): the inlined one keeps
    its names, the main graph's names stay unique, and a nested If inside the branch keeps working."""
    inner_then = _branch("inner_then", [helper.make_node("Neg", ["t"], ["n"], name="inner_step")], [_out("n")])
    inner_else = _branch("inner_else", [helper.make_node("Abs", ["t"], ["n"], name="inner_step")], [_out("n")])
    then_graph = _branch(
        "then",
        [helper.make_node("Relu", ["x"], ["t"], name="step"),
         helper.make_node("If", ["mode"], ["inner_out"], name="inner", then_branch=inner_then,
                          else_branch=inner_else)],
        [_out("inner_out")],
    )
    else_graph = _branch("else", [helper.make_node("Abs", ["x"], ["t"], name="step")], [_out("t")])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["u"], name="first"),
         helper.make_node("If", ["condition"], ["branch_out"], name="choice", then_branch=then_graph,
                          else_branch=else_graph),
         helper.make_node("Add", ["u", "branch_out"], ["y"], name="sum")],
        "siblings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("mode", TensorProto.BOOL, [])],
        [_out("y")],
        [numpy_helper.from_array(np.array([True]), "condition")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    for mode in (True, False):
        checked = check_pass(model, FoldConstantIf(), feeds={"x": x, "mode": np.array(mode)})
        expected = np.maximum(x, 0) + (-np.maximum(x, 0) if mode else np.maximum(x, 0))
        np.testing.assert_allclose(checked.outputs_after["y"], expected)
    names = [node.name for node in checked.proto.graph.node]
    assert len(names) == len(set(names)) and op_types(checked.proto) == ["Relu", "Relu", "If", "Add"]


def test_non_constant_and_multi_element_conditions_are_left_alone(caplog):
    then_graph = _branch("then", [helper.make_node("Neg", ["x"], ["t"], name="neg")], [_out("t")])
    else_graph = _branch("else", [helper.make_node("Abs", ["x"], ["e"], name="abs")], [_out("e")])
    model = _if_model(then_graph, else_graph, np.array([True, False]), [_out("y")])
    # onnxruntime refuses a two-element condition at run time; the pass leaves it
    with pytest.raises(onnxruntime_errors.Fail, match="condition input must have exactly one element"):
        check_pass(model, FoldConstantIf(), expect_modified=False)
    caplog.set_level("INFO", logger="qgraph.passes.canonicalize.fold_constant_if")
    result = FoldConstantIf()(ir.serde.deserialize_model(model))
    assert not result.modified
    assert "holds 2 elements" in caplog.text
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
              helper.make_tensor_value_info("condition", TensorProto.BOOL, [])]
    graph_input_condition = _if_model(then_graph, else_graph, np.array(True), [_out("y")], inputs=inputs)
    check_pass(graph_input_condition, FoldConstantIf(), expect_modified=False,
               feeds={"x": np.ones((2, 3), np.float32), "condition": np.array(False)})


def test_the_canonical_pipeline_folds_an_if_on_a_fixed_input():
    from qgraph.pipeline import OptimizeOptions, optimize

    model = ir.serde.deserialize_model(speech_model())
    result = optimize(model, options=OptimizeOptions(fixed_inputs={"sample_rate": np.array(16000)}))
    proto = ir.serde.serialize_model(result.model)
    assert "If" not in op_types(proto) and [value.name for value in proto.graph.input] == ["audio"]
    from qgraph.testing import run_model

    feeds = _feeds()
    expected = run_model(speech_model(), {**feeds, "sample_rate": np.array(16000)})["logits"]
    np.testing.assert_allclose(run_model(proto, feeds)["logits"], expected, rtol=1e-5, atol=1e-6)
    assert feeds["audio"].shape == (2, SEQUENCE, FEATURES)

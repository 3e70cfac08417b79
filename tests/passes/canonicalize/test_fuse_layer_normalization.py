"""FuseLayerNormalization on the spellings of torch.onnx and tf2onnx, and on the forms it must refuse."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from qgraph.passes.canonicalize.fuse_layer_normalization import FuseLayerNormalization
from qgraph.testing import check_pass, op_types, to_ir
from tests.passes.exporter_spellings import layer_norm

DECOMPOSED_OPS = {"ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Reciprocal", "Mul", "Add"}


def _fused(model: onnx.ModelProto, **tolerances):
    check = check_pass(model, FuseLayerNormalization(), **tolerances)
    ops = op_types(check.model)
    assert ops.count("LayerNormalization") == 1, ops
    return check, ops


@pytest.mark.parametrize(
    "options",
    [
        {"spelling": "torch"},
        {"spelling": "mul_square"},
        {"spelling": "tf2onnx"},
        {"spelling": "torch", "swap_operands": True},
        {"spelling": "tf2onnx", "swap_operands": True},
        {"spelling": "torch", "opset": 18},
        {"spelling": "tf2onnx", "opset": 18},
        {"spelling": "torch", "opset": 21},
    ],
    ids=lambda options: "-".join(f"{key}={value}" for key, value in options.items()),
)
def test_each_exporter_spelling_fuses_into_one_layer_normalization(options):
    check, ops = _fused(layer_norm(**options))
    assert ops == ["LayerNormalization"]
    node = next(iter(check.model.graph))
    assert node.attributes["axis"].as_int() == -1
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    # The decomposed constants are gone; the scale and bias initializers keep the exporter's values.
    assert set(check.model.graph.initializers) == {node.inputs[1].name, node.inputs[2].name}
    original = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in layer_norm(**options).graph.initializer}
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), original["gamma"])
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), original["beta"])


@pytest.mark.parametrize("affine", ["none", "scale"])
def test_without_the_affine_part_scale_one_and_bias_zero_are_synthesised(affine):
    check, ops = _fused(layer_norm(affine=affine))
    assert ops == ["LayerNormalization"]
    node = next(iter(check.model.graph))
    scale, bias = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()
    assert scale.shape == bias.shape == (16,)
    np.testing.assert_array_equal(bias, np.zeros(16, np.float32))
    if affine == "none":
        np.testing.assert_array_equal(scale, np.ones(16, np.float32))


@pytest.mark.parametrize("opset", [17, 18])
def test_the_last_two_axes_fuse_with_axis_minus_two(opset):
    check, _ = _fused(layer_norm(opset=opset, shape=(2, "batch", 4, 8), normalized_axes=2))
    node = next(iter(check.model.graph))
    assert node.attributes["axis"].as_int() == -2
    assert node.inputs[1].const_value.numpy().shape == (4, 8)


def test_positive_axes_of_a_known_rank_are_trailing_axes():
    check, _ = _fused(layer_norm(shape=(2, 5, 16), axes=[2]))
    assert next(iter(check.model.graph)).attributes["axis"].as_int() == -1


def test_epsilon_zero_fuses():
    _fused(layer_norm(epsilon=0.0), atol=1e-5)


def test_a_graph_output_name_is_kept():
    check, _ = _fused(layer_norm())
    assert [output.name for output in check.model.graph.outputs] == ["y"]


def _refused(model: onnx.ModelProto, caplog, reason: str) -> None:
    with caplog.at_level(logging.INFO, logger="qgraph.passes.infrastructure"):
        check = check_pass(model, FuseLayerNormalization(), expect_modified=False)
    assert "LayerNormalization" not in op_types(check.model)
    messages = " | ".join(record.getMessage() for record in caplog.records)
    assert reason in messages, messages


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"epsilon_after_sqrt": True}, "epsilon is added after Sqrt"),
        ({"mean_fan_out": True}, "(fan-out)"),
        ({"axes": [1]}, "not the trailing axes"),
        ({"axes": [-2], "shape": (2, 5, 16)}, "not the trailing axes"),
        ({"variance_axes": [-2, -1], "normalized_axes": 1, "shape": (2, 4, 8)}, "different axes"),
        ({"keepdims": 0, "shape": (4, 4)}, "keepdims=0"),
        ({"opset": 13}, "needs opset 17"),
        ({"opset": 16, "spelling": "tf2onnx"}, "needs opset 17"),
    ],
    ids=["eps-after-sqrt", "mean-fan-out", "leading-axis", "middle-axis", "variance-axes", "keepdims-0",
         "opset-13", "opset-16"],
)
def test_refusals_leave_the_graph_unchanged_and_say_why(options, reason, caplog):
    _refused(layer_norm(**options), caplog, reason)


def test_a_non_constant_scale_stays_outside_the_fused_node():
    model = layer_norm(scale_as_input=True)
    check = check_pass(model, FuseLayerNormalization())
    ops = op_types(check.model)
    assert ops == ["LayerNormalization", "Mul", "Add"]
    node = next(iter(check.model.graph))
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), np.ones(16, np.float32))


def test_an_intermediate_graph_output_is_fan_out(caplog):
    model = layer_norm()
    model.graph.output.append(onnx.helper.make_tensor_value_info("deviation", onnx.TensorProto.FLOAT, [2, 5, 1]))
    _refused(model, caplog, "graph output")


def test_a_second_reader_of_the_variance_is_fan_out(caplog):
    model = layer_norm()
    model.graph.node.append(onnx.helper.make_node("Neg", ["variance"], ["negative_variance"], name="reader"))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("negative_variance", onnx.TensorProto.FLOAT, [2, 5, 1])
    )
    _refused(model, caplog, "(fan-out)")


def test_a_plain_reduce_mean_is_not_a_candidate():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8] x) => (float[2, 1] y) {
        y = ReduceMean <axes = [-1]> (x)
    }
    """
    result = FuseLayerNormalization()(to_ir(text))
    assert not result.modified


def test_each_norm_of_a_two_layer_model_fuses():
    first = layer_norm()
    model = layer_norm()
    # Chain two LayerNorms: rename the second one's values and feed it the first one's output.
    renamed = {name: f"second_{name}" for node in model.graph.node for name in list(node.output)}
    renamed.update({tensor.name: f"second_{tensor.name}" for tensor in model.graph.initializer})
    renamed["x"] = "y"
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.name = f"second_{node.name}"
    for tensor in model.graph.initializer:
        tensor.name = renamed[tensor.name]
    first.graph.node.extend(model.graph.node)
    first.graph.initializer.extend(model.graph.initializer)
    first.graph.output[0].name = "second_y"
    check = check_pass(first, FuseLayerNormalization())
    assert op_types(check.model) == ["LayerNormalization", "LayerNormalization"]


def test_the_fusions_run_after_constant_folding_and_before_the_bias_and_batch_norm_passes():
    from qgraph.pipeline import CANONICAL_PASSES

    order = {name: index for index, name in enumerate(CANONICAL_PASSES)}
    for fusion in ("FuseLayerNormalization", "FuseGelu"):
        assert order["LiftConstants"] < order["FoldConstants"] < order[fusion]
        assert order[fusion] < order["MergeBiasAdd"] < order["FoldBatchNorm"]


def test_a_layer_norm_inside_an_if_branch_fuses_there():
    body_model = layer_norm()
    body = onnx.helper.make_graph(
        list(body_model.graph.node), "then_branch", [], list(body_model.graph.output),
        list(body_model.graph.initializer),
    )
    other = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["x_copy"])], "else_branch", [],
        [onnx.helper.make_tensor_value_info("x_copy", onnx.TensorProto.FLOAT, [2, 5, 16])],
    )
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["flag"], ["result"], then_branch=body, else_branch=other)],
        "branches",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5, 16]),
         onnx.helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("result", onnx.TensorProto.FLOAT, [2, 5, 16])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 5, 16)).astype(np.float32), "flag": np.array(True)}
    check = check_pass(model, FuseLayerNormalization(), feeds=feeds)
    branch = check.model.graph.node(0).attributes["then_branch"].as_graph()
    assert [node.op_type for node in branch] == ["LayerNormalization"]


def test_the_fused_layer_norm_stays_fp32_in_the_quantization_plan():
    from qgraph.annotate.annotator import annotate
    from qgraph.targets import TargetOptions, get_target

    check = check_pass(layer_norm(), FuseLayerNormalization())
    plan = annotate(check.model, get_target("ort-cpu", TargetOptions()).rules())
    (name,) = [node.name for node in check.model.graph]
    assert "normalisation stays FP32" in plan.fp32_nodes[name]


@pytest.mark.parametrize("spelling", ["torch", "tf2onnx"])
def test_the_canonical_pipeline_fuses_exports_whose_constants_are_constant_nodes(spelling):
    from qgraph.pipeline import optimize
    from qgraph.testing import run_model
    from tests.passes.exporter_spellings import gelu_erf

    for model in (layer_norm(spelling=spelling, opset=18), gelu_erf()):
        # torch.onnx writes eps, gamma, 1.4142135… as Constant nodes; LiftConstants makes them initializers first.
        constants = [onnx.helper.make_node("Constant", [], [tensor.name], value=tensor) for tensor in
                     model.graph.initializer]
        nodes = constants + list(model.graph.node)
        del model.graph.initializer[:], model.graph.node[:]
        model.graph.node.extend(nodes)
        shape = [dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim]
        feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        expected = run_model(model, feeds)
        result = optimize(to_ir(model))
        assert op_types(result.model) in (["LayerNormalization"], ["Gelu"])
        actual = run_model(result.model, feeds)
        for name, values in expected.items():
            np.testing.assert_allclose(actual[name], values, rtol=1e-5, atol=1e-6)

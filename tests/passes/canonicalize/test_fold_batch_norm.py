"""FoldBatchNorm: BatchNorm folded into Conv / ConvTranspose / Gemm / MatMul(+Add), and every refusal."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.passes.canonicalize.fold_batch_norm import FoldBatchNorm
from qgraph.testing import check_pass, op_types
from tests.passes.batch_norm_builders import (
    batch_norm_node,
    batch_norm_parameters,
    make_model,
    weights,
    with_element_type,
)


def convolution_batch_norm(op_type: str, weight_shape: tuple[int, ...], channels: int, x_shape: list[int],
                           y_shape: list[int] | None, *, bias: bool, seed: int, **attributes) -> onnx.ModelProto:
    """x → ``op_type``(W[, B]) → BatchNorm → y, with ``channels`` output channels and seeded weights."""
    initializers = {"W": weights(weight_shape, seed)}
    conv_inputs = ["x", "W"]
    if bias:
        initializers["B"] = weights((channels,), seed + 1)
        conv_inputs.append("B")
    initializers.update(batch_norm_parameters("bn", channels, seed + 2))
    nodes = [
        helper.make_node(op_type, conv_inputs, ["conv"], name="conv", **attributes),
        batch_norm_node("bn", "conv", "y"),
    ]
    return make_model(nodes, [("x", x_shape)], [("y", y_shape)], initializers)


def conv_bn_model(*, channels_in=4, channels_out=6, group=1, spatial=(5, 5), bias=True) -> onnx.ModelProto:
    kernel = (3,) * len(spatial)
    return convolution_batch_norm(
        "Conv", (channels_out, channels_in // group) + kernel, channels_out, [2, channels_in, *spatial],
        [2, channels_out, *spatial], bias=bias, seed=1, group=group, pads=[1] * (2 * len(spatial)),
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "group, channels_in, channels_out, spatial",
    [(1, 4, 6, (5, 5)), (4, 4, 4, (5, 5)), (1, 3, 5, (7,)), (3, 3, 3, (7,)), (2, 4, 6, (3, 3, 3))],
    ids=["2d", "2d-depthwise", "1d", "1d-depthwise", "3d-grouped"],
)
def test_conv_batch_norm_folds(bias, group, channels_in, channels_out, spatial):
    model = conv_bn_model(channels_in=channels_in, channels_out=channels_out, group=group, spatial=spatial, bias=bias)
    result = check_pass(model, FoldBatchNorm())
    assert op_types(result.model) == ["Conv"]
    conv = next(iter(result.model.graph))
    assert len(conv.inputs) == 3 and conv.attributes.get_int("group", 1) == group
    assert conv.outputs[0].name == "y"
    # The folded model keeps only the new weights: the originals nobody reads were dropped.
    assert set(result.model.graph.initializers) == {conv.inputs[1].name, conv.inputs[2].name}


@pytest.mark.parametrize(
    "group, channels_in, channels_out, strides",
    [(1, 4, 6, [1, 1]), (2, 4, 6, [2, 2]), (4, 8, 4, [2, 1]), (2, 6, 4, [2, 2])],
    ids=["group1", "group2-stride2", "group4-stride21", "group2-in6-out4"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_batch_norm_folds(group, channels_in, channels_out, strides, bias):
    # Weight layout (C_in, C_out/group, kH, kW): the per-output-channel scale lies on axis 1, per group.
    model = convolution_batch_norm("ConvTranspose", (channels_in, channels_out // group, 3, 2), channels_out,
                                   [1, channels_in, 4, 3], None, bias=bias, seed=4, group=group, strides=strides)
    result = check_pass(model, FoldBatchNorm())
    assert op_types(result.model) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (6,), (1, 6), (3, 1)], ids=["no-C", "C-N", "C-1N", "C-M1"])
def test_gemm_batch_norm_folds(trans_b, bias_shape):
    initializers = {"B": weights((6, 5) if trans_b else (5, 6), 7)}
    gemm_inputs = ["a", "B"]
    if bias_shape is not None:
        initializers["C"] = weights(bias_shape, 8)
        gemm_inputs.append("C")
    initializers.update(batch_norm_parameters("bn", 6, 9))
    nodes = [
        helper.make_node("Gemm", gemm_inputs, ["gemm"], name="gemm", transB=trans_b, alpha=0.75, beta=1.5),
        batch_norm_node("bn", "gemm", "y"),
    ]
    model = make_model(nodes, [("a", [3, 5])], [("y", [3, 6])], initializers)
    result = check_pass(model, FoldBatchNorm())
    assert op_types(result.model) == ["Gemm"]
    gemm = next(iter(result.model.graph))
    assert gemm.attributes.get_float("alpha", 1.0) == pytest.approx(0.75)
    assert gemm.attributes.get_float("beta", 1.0) == 1.0


@pytest.mark.parametrize("bias_shape", [None, (6,), (1, 6)], ids=["no-add", "add-N", "add-1N"])
def test_matmul_batch_norm_folds(bias_shape):
    initializers = {"W": weights((5, 6), 10)}
    initializers.update(batch_norm_parameters("bn", 6, 11))
    nodes = [helper.make_node("MatMul", ["a", "W"], ["matmul"], name="matmul")]
    source = "matmul"
    if bias_shape is not None:
        initializers["bias"] = weights(bias_shape, 12)
        nodes.append(helper.make_node("Add", ["bias", "matmul"], ["biased"], name="add"))
        source = "biased"
    nodes.append(batch_norm_node("bn", source, "y"))
    model = make_model(nodes, [("a", [3, 5])], [("y", [3, 6])], initializers)
    result = check_pass(model, FoldBatchNorm())
    assert op_types(result.model) == ["MatMul", "Add"]


def test_float64_gemm_batch_norm_folds_in_its_own_dtype():
    initializers = {"B": weights((5, 6), 23), "C": weights((6,), 24)}
    initializers.update(batch_norm_parameters("bn", 6, 25))
    nodes = [helper.make_node("Gemm", ["a", "B", "C"], ["gemm"], name="gemm"), batch_norm_node("bn", "gemm", "y")]
    model = with_element_type(
        make_model(nodes, [("a", [3, 5])], [("y", [3, 6])], initializers), np.float64, TensorProto.DOUBLE
    )
    result = check_pass(model, FoldBatchNorm(), rtol=1e-12, atol=1e-12)
    assert {value.dtype for value in result.model.graph.initializers.values()} == {ir.DataType.DOUBLE}


def test_float16_conv_batch_norm_folds_in_its_own_dtype():
    model = with_element_type(conv_bn_model(), np.float16, TensorProto.FLOAT16)
    # float16 keeps ~3 significant digits: folded weights round once, the unfolded graph rounds after each op.
    result = check_pass(model, FoldBatchNorm(), rtol=1e-2, atol=2e-2)
    assert op_types(result.model) == ["Conv"]
    assert {value.dtype for value in result.model.graph.initializers.values()} == {ir.DataType.FLOAT16}


# Refusals: the pass must leave the graph exactly as it was and say modified=False.


def test_training_mode_batch_norm_is_left_alone():
    model = conv_bn_model()
    batch_norm = model.graph.node[1]
    batch_norm.output.extend(["running_mean", "running_var"])
    batch_norm.attribute.append(helper.make_attribute("training_mode", 1))
    result = FoldBatchNorm()(ir.serde.deserialize_model(model))
    assert not result.modified
    assert op_types(result.model) == ["Conv", "BatchNormalization"]


def test_batch_norm_with_extra_outputs_is_left_alone():
    model = conv_bn_model()
    model.graph.node[1].output.extend(["running_mean", "running_var"])
    result = FoldBatchNorm()(ir.serde.deserialize_model(model))
    assert not result.modified


def _conv_batch_norm_beside(other: onnx.NodeProto, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x → Conv(W) → ``conv`` → BatchNorm → y, with ``other`` (which writes z) beside them; also the initializers."""
    initializers = {"W": weights((4, 3, 3, 3), seed)}
    initializers.update(batch_norm_parameters("bn", 4, seed + 1))
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"], name="conv"), batch_norm_node("bn", "conv", "y"), other]
    return make_model(nodes, [("x", [1, 3, 5, 5])], [("y", None), ("z", None)], initializers), initializers


def test_shared_conv_weight_is_copied_not_mutated():
    # Two Convs read W; only the first is followed by a BatchNorm. The fold writes a new weight, so the second
    # Conv still computes with the original one (check_pass compares both outputs).
    model, initializers = _conv_batch_norm_beside(helper.make_node("Conv", ["x", "W"], ["z"], name="conv_b"), 13)
    result = check_pass(model, FoldBatchNorm())
    assert op_types(result.model) == ["Conv", "Conv"]
    second = [node for node in result.model.graph if node.name == "conv_b"][0]
    assert second.inputs[1].name == "W"
    np.testing.assert_array_equal(second.inputs[1].const_value.numpy(), initializers["W"].astype(np.float32))


def test_conv_output_fan_out_is_refused():
    model, _ = _conv_batch_norm_beside(helper.make_node("Relu", ["conv"], ["z"], name="relu"), 15)
    result = check_pass(model, FoldBatchNorm(), expect_modified=False)
    assert op_types(result.model) == ["Conv", "BatchNormalization", "Relu"]


def test_conv_output_that_is_a_graph_output_is_refused():
    model = conv_bn_model()
    model.graph.output.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, [2, 6, 5, 5]))
    check_pass(model, FoldBatchNorm(), expect_modified=False)


def test_non_constant_batch_norm_scale_is_refused():
    initializers = {"W": weights((4, 3, 3, 3), 17)}
    initializers.update(batch_norm_parameters("bn", 4, 18))
    del initializers["bn_gamma"]
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"], name="conv"), batch_norm_node("bn", "conv", "y")]
    model = make_model(nodes, [("x", [1, 3, 5, 5]), ("bn_gamma", [4])], [("y", None)], initializers)
    result = check_pass(model, FoldBatchNorm(), expect_modified=False)
    assert op_types(result.model) == ["Conv", "BatchNormalization"]


def test_weight_that_is_a_graph_input_is_refused():
    model = conv_bn_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [6, 4, 3, 3]))
    check_pass(model, FoldBatchNorm(), expect_modified=False)


def test_matmul_on_3d_input_is_refused():
    # BatchNormalization normalises axis 1 of (B, S, N): that is the sequence axis, not the MatMul's features.
    initializers = {"W": weights((5, 4), 19)}
    initializers.update(batch_norm_parameters("bn", 4, 20))
    nodes = [helper.make_node("MatMul", ["a", "W"], ["matmul"], name="matmul"), batch_norm_node("bn", "matmul", "y")]
    model = make_model(nodes, [("a", [2, 4, 5])], [("y", [2, 4, 4])], initializers)
    result = check_pass(model, FoldBatchNorm(), expect_modified=False)
    assert op_types(result.model) == ["MatMul", "BatchNormalization"]


def test_batch_norm_in_a_subgraph_folds():
    body_initializers = batch_norm_parameters("bn", 6, 21)
    body_initializers["W"] = weights((6, 4, 3, 3), 22)
    body = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["conv"], pads=[1, 1, 1, 1]), batch_norm_node("bn", "conv", "y_then")],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(array.astype(np.float32), name) for name, array in body_initializers.items()],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["condition"]),
        helper.make_node("If", ["condition"], ["y"], then_branch=body, else_branch=other),
    ]
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y", None)], {"zero": np.array(-1e9)})
    result = check_pass(model, FoldBatchNorm())
    then_branch = next(node for node in result.model.graph if node.op_type == "If").attributes["then_branch"].value
    assert [node.op_type for node in then_branch] == ["Conv"]

"""MergeBiasAdd: a constant per-channel Add merges into Conv/ConvTranspose/Gemm bias; MatMul + Add becomes Gemm."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from qgraph.passes.canonicalize.fold_batch_norm import FoldBatchNorm
from qgraph.passes.canonicalize.merge_bias_add import MergeBiasAdd, is_channel_bias
from qgraph.passes.infrastructure import PassManager
from qgraph.testing import check_pass, op_types, run_model
from tests.passes.batch_norm_builders import batch_norm_node, batch_norm_parameters, make_model, weights


def conv_add_model(bias_shape, *, conv_bias=True, op="Conv", group=1, spatial=(4, 4), bias_first=False):
    channels_in, channels_out = 4, 6
    kernel = (3,) * len(spatial)
    if op == "Conv":
        weight_shape = (channels_out, channels_in // group) + kernel
    else:
        weight_shape = (channels_in, channels_out // group) + kernel
    initializers = {"W": weights(weight_shape, 1), "c": weights(bias_shape, 2)}
    conv_inputs = ["x", "W"]
    if conv_bias:
        initializers["B"] = weights((channels_out,), 3)
        conv_inputs.append("B")
    add_inputs = ["c", "conv"] if bias_first else ["conv", "c"]
    nodes = [
        helper.make_node(op, conv_inputs, ["conv"], name="conv", group=group),
        helper.make_node("Add", add_inputs, ["y"], name="add"),
    ]
    return make_model(nodes, [("x", [2, channels_in, *spatial])], [("y", None)], initializers)


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("bias_shape", [(6, 1, 1), (1, 6, 1, 1), (1, 1, 1), (1,), ()], ids=str)
def test_conv_channel_bias_merges(bias_shape, conv_bias):
    # Both operand orders: Add(c, conv) with a Conv bias, Add(conv, c) without.
    result = check_pass(conv_add_model(bias_shape, conv_bias=conv_bias, bias_first=conv_bias), MergeBiasAdd())
    assert op_types(result.model) == ["Conv"]
    conv = next(iter(result.model.graph))
    assert conv.outputs[0].name == "y" and conv.inputs[2].const_value.shape == (6,)
    assert set(result.model.graph.initializers) == {"W", conv.inputs[2].name}


def test_conv_1d_channel_bias_merges():
    check_pass(conv_add_model((6, 1), spatial=(7,)), MergeBiasAdd())


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_channel_bias_merges(group):
    result = check_pass(conv_add_model((1, 6, 1, 1), op="ConvTranspose", group=group), MergeBiasAdd())
    assert op_types(result.model) == ["ConvTranspose"]


@pytest.mark.parametrize(
    "bias_shape",
    [(6,), (4,), (1, 1, 1, 6), (2, 6, 1, 1), (1, 1, 6, 1, 1)],
    ids=["C-on-last-axis", "W-on-last-axis", "last-axis-4d", "per-batch", "rank-grows"],
)
def test_conv_non_channel_constant_is_refused(bias_shape):
    # A (C,) constant added to NCHW runs along W, not along C: not a bias, whatever the sizes.
    # Input sizes chosen so that the Add is valid ONNX: a 3x3 kernel without padding trims 2 from each side.
    spatial = {(6,): (8, 8), (1, 1, 1, 6): (8, 8), (4,): (6, 6)}.get(bias_shape, (4, 4))
    result = check_pass(conv_add_model(bias_shape, spatial=spatial), MergeBiasAdd(), expect_modified=False)
    assert op_types(result.model) == ["Conv", "Add"]


def test_is_channel_bias_follows_right_aligned_broadcasting():
    assert is_channel_bias((8, 1, 1), 4, 8)
    assert is_channel_bias((1, 8, 1, 1), 4, 8)
    assert not is_channel_bias((8,), 4, 8)
    assert is_channel_bias((8,), 2, 8)
    assert not is_channel_bias((8, 1), 4, 8)  # (1, 1, 8, 1): the H axis
    assert not is_channel_bias((1, 1, 8, 1, 1), 4, 8)


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (1,)], ids=str)
def test_matmul_bias_becomes_gemm(bias_shape):
    initializers = {"W": weights((3, 5), 4), "c": weights(bias_shape, 5)}
    nodes = [helper.make_node("MatMul", ["a", "W"], ["matmul"]), helper.make_node("Add", ["matmul", "c"], ["y"])]
    model = make_model(nodes, [("a", [4, 3])], [("y", [4, 5])], initializers)
    result = check_pass(model, MergeBiasAdd())
    assert op_types(result.model) == ["Gemm"]


def test_matmul_on_3d_input_is_refused():
    initializers = {"W": weights((3, 5), 6), "c": weights((5,), 7)}
    nodes = [helper.make_node("MatMul", ["a", "W"], ["matmul"]), helper.make_node("Add", ["matmul", "c"], ["y"])]
    model = make_model(nodes, [("a", [2, 4, 3])], [("y", [2, 4, 5])], initializers)
    check_pass(model, MergeBiasAdd(), expect_modified=False)


def test_matmul_with_per_row_constant_is_refused():
    initializers = {"W": weights((3, 5), 8), "c": weights((4, 1), 9)}
    nodes = [helper.make_node("MatMul", ["a", "W"], ["matmul"]), helper.make_node("Add", ["matmul", "c"], ["y"])]
    model = make_model(nodes, [("a", [4, 3])], [("y", [4, 5])], initializers)
    check_pass(model, MergeBiasAdd(), expect_modified=False)


@pytest.mark.parametrize("existing", [None, (5,), (4, 1)], ids=["no-C", "C-N", "C-M1"])
@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (4, 5)], ids=["N", "1N", "MN"])
def test_gemm_bias_merges_into_c(existing, bias_shape):
    initializers = {"B": weights((5, 3), 10), "c": weights(bias_shape, 11)}
    gemm_inputs = ["a", "B"]
    if existing is not None:
        initializers["C"] = weights(existing, 12)
        gemm_inputs.append("C")
    nodes = [
        helper.make_node("Gemm", gemm_inputs, ["gemm"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Add", ["gemm", "c"], ["y"]),
    ]
    model = make_model(nodes, [("a", [4, 3])], [("y", [4, 5])], initializers)
    result = check_pass(model, MergeBiasAdd())
    assert op_types(result.model) == ["Gemm"]


def test_conv_output_with_another_reader_is_refused():
    model = conv_add_model((6, 1, 1))
    model.graph.node.append(helper.make_node("Relu", ["conv"], ["z"]))
    model.graph.output.append(helper.make_tensor_value_info("z", 1, [2, 6, 2, 2]))
    result = check_pass(model, MergeBiasAdd(), expect_modified=False)
    assert op_types(result.model) == ["Conv", "Add", "Relu"]


def test_non_constant_bias_is_refused():
    initializers = {"W": weights((6, 4, 3, 3), 13)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"]), helper.make_node("Add", ["conv", "c"], ["y"])]
    model = make_model(nodes, [("x", [2, 4, 4, 4]), ("c", [6, 1, 1])], [("y", None)], initializers)
    check_pass(model, MergeBiasAdd(), expect_modified=False)


def test_residual_add_of_two_convs_is_refused():
    initializers = {"W": weights((4, 4, 3, 3), 14), "V": weights((4, 4, 1, 1), 15)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "V"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = make_model(nodes, [("x", [1, 4, 4, 4])], [("y", None)], initializers)
    check_pass(model, MergeBiasAdd(), expect_modified=False)


def test_shared_bias_constant_is_not_mutated():
    # The same constant is added after two Convs: each gets its own merged bias and the constant stays as it was.
    initializers = {"W": weights((6, 4, 3, 3), 16), "V": weights((6, 4, 3, 3), 17), "c": weights((6, 1, 1), 18)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"]),
        helper.make_node("Add", ["a", "c"], ["y"]),
        helper.make_node("Conv", ["x", "V"], ["b"]),
        helper.make_node("Add", ["b", "c"], ["z"]),
    ]
    model = make_model(nodes, [("x", [1, 4, 4, 4])], [("y", None), ("z", None)], initializers)
    result = check_pass(model, MergeBiasAdd())
    assert op_types(result.model) == ["Conv", "Conv"]
    assert "c" not in result.model.graph.initializers  # nobody reads it any more


def test_matmul_add_batch_norm_folds_through_gemm_in_canonical_order():
    initializers = {"W": weights((3, 5), 19), "c": weights((5,), 20)}
    initializers.update(batch_norm_parameters("bn", 5, 21))
    nodes = [
        helper.make_node("MatMul", ["a", "W"], ["matmul"]),
        helper.make_node("Add", ["matmul", "c"], ["biased"]),
        batch_norm_node("bn", "biased", "y"),
    ]
    model = make_model(nodes, [("a", [4, 3])], [("y", [4, 5])], initializers)
    result = PassManager([MergeBiasAdd(), FoldBatchNorm()], fixed_point=True).run(ir.serde.deserialize_model(model))
    assert op_types(result.model) == ["Gemm"]
    feeds = {"a": np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)}
    np.testing.assert_allclose(
        run_model(result.model, feeds)["y"], run_model(model, feeds)["y"], rtol=1e-5, atol=1e-6
    )

"""DecomposeBatchNorm: a lone inference BatchNorm becomes Mul + Add; foldable ones are left to FoldBatchNorm."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qgraph.passes.canonicalize.decompose_batch_norm import DecomposeBatchNorm
from qgraph.passes.canonicalize.fold_batch_norm import FoldBatchNorm
from qgraph.passes.infrastructure import PassManager
from qgraph.testing import check_pass, op_types, run_model
from tests.passes.batch_norm_builders import (
    batch_norm_node,
    batch_norm_parameters,
    make_model,
    weights,
    with_element_type,
)


@pytest.mark.parametrize("shape", [[2, 3], [2, 3, 7], [2, 3, 4, 5], [1, 3, 2, 3, 4]], ids=["2d", "3d", "4d", "5d"])
def test_lone_batch_norm_on_a_graph_input_becomes_mul_add(shape):
    model = make_model(
        [batch_norm_node("bn", "x", "y")], [("x", shape)], [("y", shape)], batch_norm_parameters("bn", 3, 1)
    )
    result = check_pass(model, DecomposeBatchNorm())
    assert op_types(result.model) == ["Mul", "Add"]
    scale = result.model.graph.initializers["bn_scale"].const_value.numpy()
    assert scale.shape == (3,) + (1,) * (len(shape) - 2)
    # Only the new scale and shift remain: the BatchNorm parameters nobody reads were dropped.
    assert set(result.model.graph.initializers) == {"bn_scale", "bn_shift"}


def test_batch_norm_after_relu_becomes_mul_add():
    # The Relu output carries no shape annotation: the rank comes from the graph input behind the Relu.
    nodes = [helper.make_node("Relu", ["x"], ["relu"]), batch_norm_node("bn", "relu", "y")]
    model = make_model(nodes, [("x", [2, 4, 3, 3])], [("y", [2, 4, 3, 3])], batch_norm_parameters("bn", 4, 2))
    result = check_pass(model, DecomposeBatchNorm())
    assert op_types(result.model) == ["Relu", "Mul", "Add"]


def test_batch_norm_with_dynamic_batch_and_spatial_dimensions():
    model = make_model(
        [batch_norm_node("bn", "x", "y")],
        [("x", ["batch", 5, "height", "width"])],
        [("y", ["batch", 5, "height", "width"])],
        batch_norm_parameters("bn", 5, 3),
    )
    check_pass(model, DecomposeBatchNorm())


def test_float16_batch_norm_decomposes_in_its_own_dtype():
    model = make_model(
        [batch_norm_node("bn", "x", "y")], [("x", [2, 3, 4])], [("y", [2, 3, 4])], batch_norm_parameters("bn", 3, 11)
    )
    model = with_element_type(model, np.float16, TensorProto.FLOAT16)
    result = check_pass(model, DecomposeBatchNorm(), rtol=1e-2, atol=2e-2)
    assert {value.dtype for value in result.model.graph.initializers.values()} == {ir.DataType.FLOAT16}


def test_foldable_batch_norm_is_left_to_fold_batch_norm(caplog):
    initializers = {"W": weights((4, 3, 3, 3), 4)}
    initializers.update(batch_norm_parameters("bn", 4, 5))
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"]), batch_norm_node("bn", "conv", "y")]
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", None)], initializers)
    with caplog.at_level(logging.INFO, logger="qgraph.passes.infrastructure"):
        result = check_pass(model, DecomposeBatchNorm(), expect_modified=False)
    assert op_types(result.model) == ["Conv", "BatchNormalization"]
    assert "foldable into producer" in caplog.text


def test_batch_norm_after_conv_with_fan_out_is_decomposed():
    # FoldBatchNorm refuses (the Conv output has a second reader), so the BatchNorm is not foldable: decompose it.
    initializers = {"W": weights((4, 3, 3, 3), 6)}
    initializers.update(batch_norm_parameters("bn", 4, 7))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["conv"]),
        batch_norm_node("bn", "conv", "y"),
        helper.make_node("Relu", ["conv"], ["z"]),
    ]
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", None), ("z", None)], initializers)
    result = check_pass(model, DecomposeBatchNorm())
    assert op_types(result.model) == ["Conv", "Mul", "Add", "Relu"]


def test_training_mode_batch_norm_is_refused():
    node = batch_norm_node("bn", "x", "y", training_mode=1)
    node.output.extend(["running_mean", "running_var"])
    model = make_model([node], [("x", [2, 3, 4])], [("y", [2, 3, 4])], batch_norm_parameters("bn", 3, 8))
    result = DecomposeBatchNorm()(ir.serde.deserialize_model(model))
    assert not result.modified
    assert op_types(result.model) == ["BatchNormalization"]


def test_non_constant_scale_is_refused():
    parameters = batch_norm_parameters("bn", 3, 9)
    del parameters["bn_gamma"]
    model = make_model(
        [batch_norm_node("bn", "x", "y")], [("x", [2, 3, 4]), ("bn_gamma", [3])], [("y", [2, 3, 4])], parameters
    )
    check_pass(model, DecomposeBatchNorm(), expect_modified=False)


def test_unknown_rank_is_refused(caplog):
    # The BatchNorm reads a Reshape output and writes a graph output, neither annotated with a shape: the rank,
    # and so the (C, 1, ...) broadcast shape of scale and shift, is unknown.
    parameters = batch_norm_parameters("bn", 3, 10)
    parameters["shape"] = np.array([2, 3, -1])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["reshaped"]), batch_norm_node("bn", "reshaped", "y")]
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", [2, 3, 4])], parameters)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    with caplog.at_level(logging.INFO, logger="qgraph.passes.infrastructure"):
        result = DecomposeBatchNorm()(ir.serde.deserialize_model(model))
    assert not result.modified
    assert "rank is unknown" in caplog.text


def test_canonical_order_leaves_no_batch_norm():
    """One model with every kind: FoldBatchNorm folds what it can, DecomposeBatchNorm takes the lone BatchNorm."""
    initializers = {
        "conv_W": weights((4, 3, 3, 3), 30),
        "deconv_W": weights((4, 2, 2, 2), 31),  # group=2: (C_in=4, C_out/group=2, 2, 2) -> 4 output channels
        "gemm_B": weights((4 * 4 * 4, 5), 32),
        "gemm_C": weights((5,), 33),
        "shape": np.array([1, -1]),
    }
    for prefix, channels, seed in (("bn_conv", 4, 34), ("bn_deconv", 4, 35), ("bn_gemm", 5, 36), ("bn_lone", 5, 37)):
        initializers.update(batch_norm_parameters(prefix, channels, seed))
    nodes = [
        helper.make_node("Conv", ["x", "conv_W"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 2]),
        batch_norm_node("bn_conv", "conv", "conv_bn"),
        helper.make_node("Relu", ["conv_bn"], ["conv_relu"]),
        helper.make_node("ConvTranspose", ["conv_relu", "deconv_W"], ["deconv"], group=2, strides=[2, 2]),
        batch_norm_node("bn_deconv", "deconv", "deconv_bn"),
        helper.make_node("MaxPool", ["deconv_bn"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "gemm_B", "gemm_C"], ["gemm"]),
        batch_norm_node("bn_gemm", "gemm", "gemm_bn"),
        helper.make_node("Tanh", ["gemm_bn"], ["gemm_tanh"]),
        batch_norm_node("bn_lone", "gemm_tanh", "y"),
    ]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 5])], initializers)
    onnx.checker.check_model(model, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    expected = run_model(model, feeds)["y"]

    result = PassManager([FoldBatchNorm(), DecomposeBatchNorm()], fixed_point=True).run(
        ir.serde.deserialize_model(model)
    )
    kinds = op_types(result.model)
    assert "BatchNormalization" not in kinds
    assert kinds.count("Mul") == 1 and kinds.count("Add") == 1  # only the lone BatchNorm became Mul + Add
    assert [record.modified for record in result.records[:2]] == [True, True]
    folded = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_allclose(run_model(folded, feeds)["y"], expected, rtol=1e-5, atol=1e-6)

"""FuseGeneralLayerNormalization on flax/tf2onnx spellings (moments, ReduceSum/n, views, rsqrt forms), and refusals."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from qgraph.passes.canonicalize._pattern_matching import OpsetRefusal
from qgraph.passes.canonicalize.fuse_general_layer_normalization import FuseGeneralLayerNormalization
from qgraph.passes.infrastructure import RewriteContext
from qgraph.testing import check_pass, op_types, to_ir
from tests.passes.canonicalize.normalization_spellings import FEATURES, flax_layer_norm, rms_norm


@pytest.mark.parametrize("opset", [17, 18, 21])
@pytest.mark.parametrize("spelling", ["flax", "pow", "sum_div"])
def test_each_flax_spelling_fuses_into_one_layer_normalization(spelling, opset):
    model = flax_layer_norm(spelling, opset=opset)
    check = check_pass(model, FuseGeneralLayerNormalization(), rtol=1e-4, atol=2e-5)
    assert op_types(check.model) == ["LayerNormalization"]
    node = next(iter(check.model.graph))
    assert node.attributes["axis"].as_int() == -1
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-6)
    original = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), original["norm.scale"])
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), original["norm.bias"])
    # Every decomposed constant (1/n, 0, eps, the view shapes) is gone.
    assert set(check.model.graph.initializers) == {node.inputs[1].name, node.inputs[2].name}


def test_rows_with_a_large_mean_match_the_moments_form_closely():
    """E[x²] − E[x]² cancels for rows far from zero; the fused kernel is at least as accurate there."""
    model = flax_layer_norm("flax")
    feeds = {"x": (np.random.default_rng(1).standard_normal((2, 49, FEATURES)) + 20.0).astype(np.float32)}
    check_pass(model, FuseGeneralLayerNormalization(), feeds=feeds, rtol=1e-3, atol=1e-3)


def _analysis(model: onnx.ModelProto):
    ir_model = to_ir(model)
    context = RewriteContext(ir_model)
    fusion = FuseGeneralLayerNormalization()
    found = [(node, fusion.match(node, context)) for node in ir_model.graph]
    return [fusion.check(match, context) for _, match in found if match is not None], ir_model


def test_below_opset_17_the_refusal_names_the_opset_it_needs(caplog):
    plans, _ = _analysis(flax_layer_norm("flax", opset=15))
    assert len(plans) == 1 and isinstance(plans[0], OpsetRefusal) and plans[0].needed == 17
    with caplog.at_level(logging.DEBUG):
        check_pass(flax_layer_norm("flax", opset=15), FuseGeneralLayerNormalization(), expect_modified=False)
    assert "needs opset 17" in caplog.text


def _edit(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    edited.graph.ClearField("value_info")
    for index, tensor in enumerate(edited.graph.initializer):
        if tensor.name == name:
            edited.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(array, name))
            return edited
    raise KeyError(name)


def _initializer_of(model: onnx.ModelProto, predicate) -> str:
    return next(tensor.name for tensor in model.graph.initializer
                if predicate(onnx.numpy_helper.to_array(tensor)))


@pytest.mark.parametrize(
    "breakage",
    ["wrong_count", "reshape_changes_rows", "expand_elsewhere", "variance_without_mean_square"],
)
def test_forms_that_are_not_layer_norm_are_left_alone(breakage, caplog):
    model = flax_layer_norm("flax")
    if breakage == "wrong_count":  # ReduceSum · 1/15 over 16 features is not a mean
        name = _initializer_of(model, lambda array: array.size == 1 and np.isclose(array, 1 / FEATURES))
        model = _edit(model, name, np.array(1 / (FEATURES - 1), np.float32))
    elif breakage == "reshape_changes_rows":  # [-1, 49, 1] -> [49, -1, 1]: the statistic lands on other rows
        name = _initializer_of(model, lambda array: array.dtype == np.int64 and array.tolist() == [-1, 49, 1])
        model = _edit(model, name, np.array([49, -1, 1], np.int64))
    elif breakage == "expand_elsewhere":
        name = _initializer_of(model, lambda array: array.dtype == np.int64 and array.tolist() == [1, 49, FEATURES])
        model = _edit(model, name, np.array([2, 49, FEATURES], np.int64))
    else:  # E[x²] without the − E[x]² under a centred numerator: not a variance
        for node in model.graph.node:
            if node.op_type == "Sub" and node.input[0] != "x":
                node.op_type = "Add"
    with caplog.at_level(logging.DEBUG):
        check_pass(model, FuseGeneralLayerNormalization(), expect_modified=False, rtol=1e-4, atol=1e-5)
    assert "leaving" in caplog.text


def test_a_mean_read_outside_the_layer_norm_is_fan_out(caplog):
    model = flax_layer_norm("pow")
    mean = next(node for node in model.graph.node if node.op_type == "ReduceMean").output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(mean, onnx.TensorProto.FLOAT, ["batch", 49, 1]))
    with caplog.at_level(logging.DEBUG):
        check_pass(model, FuseGeneralLayerNormalization(), expect_modified=False)
    assert "graph output" in caplog.text


def test_a_statistic_without_keepdims_meeting_x_directly_is_refused():
    """keepdims=0 without the Reshape back: the flat mean would broadcast along the wrong axes."""
    model = flax_layer_norm("flax")
    for node in model.graph.node:
        if node.op_type == "Reshape":
            node.op_type, node.input[1:] = "Identity", []
    # Not a valid model any more (the broadcast is wrong or impossible), so only the analysis is checked.
    plans, _ = _analysis(model)
    assert plans and all(not hasattr(plan, "match") for plan in plans)


@pytest.mark.parametrize("spelling", ["pow_div", "reciprocal"])
def test_an_rms_norm_is_not_taken_for_a_layer_norm(spelling):
    check_pass(rms_norm(spelling), FuseGeneralLayerNormalization(), expect_modified=False)


def test_a_model_without_any_normalisation_logs_nothing(caplog):
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 4] x) => (float[2, 4] y) {
            s = Sigmoid(x)
            y = Mul(x, s)
        }""")
    with caplog.at_level(logging.DEBUG):
        check_pass(model, FuseGeneralLayerNormalization(), expect_modified=False)
    assert "FuseGeneralLayerNormalization" not in caplog.text

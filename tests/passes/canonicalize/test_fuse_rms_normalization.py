"""FuseRmsNormalization: RMSNorm spellings become one qgraph.fused::RMSNormalization function node."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.annotate.annotator import annotate
from qgraph.passes.canonicalize.fuse_rms_normalization import FUNCTION_NAME, FUSED_DOMAIN, FuseRmsNormalization
from qgraph.targets import get_target
from qgraph.testing import check_pass, op_types
from tests.passes.canonicalize.normalization_spellings import FEATURES, flax_layer_norm, rms_norm


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("spelling", ["pow_div", "reciprocal", "rsqrt_pow", "sum"])
def test_each_spelling_becomes_one_function_node(spelling, opset):
    check = check_pass(rms_norm(spelling, opset=opset), FuseRmsNormalization(), rtol=1e-5, atol=1e-6)
    assert op_types(check.model) == [FUNCTION_NAME]
    node = next(iter(check.model.graph))
    assert node.domain == FUSED_DOMAIN
    assert list(node.attributes["axes"].as_ints()) == [-1]
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-6)
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), np.linspace(0.5, 1.5, FEATURES, dtype=np.float32))
    assert list(check.model.functions) == [(FUSED_DOMAIN, FUNCTION_NAME, "")]


def test_without_a_scale_gamma_one_is_synthesised():
    check = check_pass(rms_norm("reciprocal", scale=False), FuseRmsNormalization())
    node = next(iter(check.model.graph))
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), np.ones(FEATURES, np.float32))


def test_two_rms_norms_share_one_function():
    model = rms_norm("pow_div")
    second = rms_norm("reciprocal")
    check = check_pass(model, FuseRmsNormalization())
    assert len(check.model.functions) == 1
    check_pass(second, FuseRmsNormalization())


def test_an_rms_norm_with_a_bias_is_refused(caplog):
    with caplog.at_level(logging.INFO):
        check_pass(rms_norm("pow_div", bias=True), FuseRmsNormalization(), expect_modified=False)
    assert "with a bias" in caplog.text


def test_a_layer_norm_is_not_taken_for_an_rms_norm():
    check_pass(flax_layer_norm("pow"), FuseRmsNormalization(), expect_modified=False)


def test_annotation_keeps_the_unit_fp32_where_the_decomposed_product_would_be_quantized():
    rules = get_target("ort-cpu").rules()
    decomposed = ir.serde.deserialize_model(rms_norm("reciprocal"))
    fused = FuseRmsNormalization()(ir.serde.deserialize_model(rms_norm("reciprocal"))).model
    reciprocal = next(node for node in decomposed.graph if node.op_type == "Reciprocal").outputs[0].name
    # the decomposed form's r = rsqrt(mean(x²)+ε) is not put on an 8-bit grid either (a binary op whose inputs are
    # not quantized stays FP32), so the fused unit loses nothing against it
    assert reciprocal not in annotate(decomposed, rules).activations
    plan = annotate(fused, rules)
    unit = next(node for node in fused.graph if node.op_type == FUNCTION_NAME)
    assert unit.name in plan.fp32_nodes
    assert all(node.op_type != "Reciprocal" for node in fused.graph)

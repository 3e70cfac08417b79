"""FuseHardSwish on the torch.onnx and Keras/tf2onnx spellings, and the forms it refuses."""

from __future__ import annotations

import logging

import onnx_ir as ir
import pytest

from qgraph.passes.canonicalize._pattern_matching import OpsetRefusal
from qgraph.passes.canonicalize.fuse_hard_swish import FuseHardSwish
from qgraph.passes.infrastructure import RewriteContext
from qgraph.testing import check_pass, op_types
from tests.passes.canonicalize.activation_spellings import hard_swish, widen

SPELLINGS = ["hard_sigmoid", "clip", "max_min", "min_max", "relu_min", "clip_product_first"]


@pytest.mark.parametrize("opset", [14, 21])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_fuses_into_hard_swish(spelling, opset):
    model = hard_swish(spelling, opset=opset)
    check = check_pass(model, FuseHardSwish(), feeds=widen(model), rtol=1e-5, atol=1e-6)
    assert op_types(check.model) == ["HardSwish"]
    assert not check.model.graph.initializers


def test_keras_hard_sigmoid_slope_is_another_function(caplog):
    with caplog.at_level(logging.INFO):
        check_pass(hard_swish("hard_sigmoid", alpha=0.2), FuseHardSwish(), expect_modified=False)
    assert "not HardSwish's" in caplog.text


def test_relu_to_a_bound_other_than_six_is_refused(caplog):
    with caplog.at_level(logging.INFO):
        check_pass(hard_swish("clip", six=5.0), FuseHardSwish(), expect_modified=False)
    assert "not ReLU6" in caplog.text


@pytest.mark.parametrize("spelling", ["hard_sigmoid", "clip"])
def test_below_opset_14_the_refusal_asks_for_opset_14(spelling):
    model = ir.serde.deserialize_model(hard_swish(spelling, opset=13))
    context = RewriteContext(model)
    fusion = FuseHardSwish()
    plans = [fusion.check(match, context) for match in (fusion.match(node, context) for node in model.graph) if match]
    assert len(plans) == 1 and isinstance(plans[0], OpsetRefusal) and plans[0].needed == 14
    check_pass(hard_swish(spelling, opset=13), FuseHardSwish(), expect_modified=False)

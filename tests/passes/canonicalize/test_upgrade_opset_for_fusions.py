"""UpgradeOpsetForFusions: converts only when a fusion asks for a newer opset, and the pipeline then fuses."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from qgraph.ir import opset_upgrade
from qgraph.ir.values import default_opset
from qgraph.passes.canonicalize.upgrade_opset_for_fusions import UpgradeOpsetForFusions, needed_opset
from qgraph.pipeline import OptimizeOptions, build_pipeline
from qgraph.testing import check_pass, op_types
from tests.passes.canonicalize.activation_spellings import hard_swish, sigmoid_gate
from tests.passes.canonicalize.normalization_spellings import flax_layer_norm


def test_a_layer_norm_at_opset_15_asks_for_17_and_gets_it():
    model = flax_layer_norm("flax", opset=15)
    assert needed_opset(ir.serde.deserialize_model(model)) == 17
    check = check_pass(model, UpgradeOpsetForFusions(), rtol=1e-6, atol=1e-6)
    assert default_opset(check.model) == 17


def test_a_hard_swish_at_opset_13_asks_for_14():
    check = check_pass(hard_swish("clip", opset=13), UpgradeOpsetForFusions())
    assert default_opset(check.model) == 14


def test_nothing_to_fuse_means_no_conversion():
    check_pass(sigmoid_gate(None, opset=13), UpgradeOpsetForFusions(), expect_modified=False)
    check_pass(flax_layer_norm("flax", opset=17), UpgradeOpsetForFusions(), expect_modified=False)


def test_a_refused_upgrade_leaves_the_model_unfused(monkeypatch):
    monkeypatch.setattr(opset_upgrade, "runtime_opset_cap", lambda: 16)
    check = check_pass(flax_layer_norm("flax", opset=15), UpgradeOpsetForFusions(), expect_modified=False)
    assert default_opset(check.model) == 15


def test_the_canonical_pipeline_upgrades_and_fuses():
    model = ir.serde.deserialize_model(hard_swish("hard_sigmoid", opset=13))
    result = build_pipeline(OptimizeOptions()).run(model)
    assert op_types(result.model) == ["HardSwish"] and default_opset(result.model) == 14
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)

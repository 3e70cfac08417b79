"""upgrade_opset: onnx's version converter, checked numerically, never beyond the runtime's cap."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph.ir import opset_upgrade, versions
from qgraph.ir.values import default_opset
from qgraph.models.flax_layernorm import build_flax_mixer
from qgraph.testing import run_model


def _model() -> ir.Model:
    return ir.serde.deserialize_model(build_flax_mixer(depth=1))


def test_the_upgraded_model_computes_the_same_outputs():
    model = _model()
    upgraded = opset_upgrade.upgrade_opset(model, 17)
    assert upgraded is not None and default_opset(upgraded) == 17
    onnx.checker.check_model(ir.serde.serialize_model(upgraded), full_check=True)
    feeds = {"input": np.random.default_rng(4).standard_normal((3, 1, 28, 28)).astype(np.float32)}
    np.testing.assert_allclose(run_model(upgraded, feeds)["logits"], run_model(model, feeds)["logits"], rtol=1e-6,
                               atol=1e-6)


def test_a_model_already_new_enough_is_returned_as_it_is():
    model = _model()
    assert opset_upgrade.upgrade_opset(model, 14) is model


def test_the_cap_is_the_runtime_s_and_is_never_exceeded(monkeypatch, caplog):
    assert opset_upgrade.runtime_opset_cap() == versions.supported_versions().opset
    monkeypatch.setattr(opset_upgrade, "runtime_opset_cap", lambda: 16)
    with caplog.at_level(logging.INFO):
        assert opset_upgrade.upgrade_opset(_model(), 17) is None
    assert "runs opsets up to 16" in caplog.text


def test_a_conversion_that_changes_an_output_is_refused(monkeypatch, caplog):
    convert = versions.convert_opset

    def wrong(proto, target):
        converted = convert(proto, target)
        bias = next(tensor for tensor in converted.graph.initializer if tensor.name == "head.bias")
        bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 0.5, "head.bias"))
        return converted

    monkeypatch.setattr(versions, "convert_opset", wrong)
    model = _model()
    with caplog.at_level(logging.WARNING):
        assert opset_upgrade.upgrade_opset(model, 17) is None
    assert "'logits' differs by up to" in caplog.text
    assert default_opset(model) == 15


def test_a_conversion_the_converter_refuses_is_refused(monkeypatch, caplog):
    from qgraph.errors import UnsupportedModelError

    def refuse(proto, target):
        raise UnsupportedModelError("no adapter for SomeOp")

    monkeypatch.setattr(versions, "convert_opset", refuse)
    with caplog.at_level(logging.INFO):
        assert opset_upgrade.upgrade_opset(_model(), 17) is None
    assert "no adapter for SomeOp" in caplog.text


@pytest.mark.parametrize("target", [17, 18])
def test_adopt_replaces_the_model_in_place(target):
    model = _model()
    upgraded = opset_upgrade.upgrade_opset(model, target)
    opset_upgrade.adopt(model, upgraded)
    assert default_opset(model) == target and model.graph is upgraded.graph

"""FuseGelu on the Erf and tanh spellings of torch.onnx and Hugging Face exports, and on near-GELUs it must refuse."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from qgraph.passes.canonicalize.fuse_gelu import FuseGelu
from qgraph.testing import check_pass, op_types
from tests.passes.exporter_spellings import gelu_erf, gelu_tanh

#: Wide enough to reach both tails and the curved middle of GELU.
FEEDS = {"x": (np.random.default_rng(0).standard_normal((3, 32)) * 4).astype(np.float32)}


def _fused(model: onnx.ModelProto) -> tuple[str, str]:
    check = check_pass(model, FuseGelu(), feeds=FEEDS)
    nodes = list(check.model.graph)
    assert len(nodes) == 1, op_types(check.model)
    # Only x is left: every constant of the decomposed form was dropped with it.
    assert not check.model.graph.initializers
    return nodes[0].domain, nodes[0].op_type


ERF_SPELLINGS = [
    {},
    {"multiply_by_inverse": True},
    {"half": "before"},
    {"half": "on_sum"},
    {"swap_operands": True},
    {"multiply_by_inverse": True, "half": "before", "swap_operands": True},
    {"half": "on_sum", "swap_operands": True},
]
TANH_SPELLINGS = [
    {},
    {"cube": "pow"},
    {"half": "after"},
    {"half": "on_sum", "cube": "pow"},
    {"swap_operands": True},
    {"swap_operands": True, "cube": "pow", "half": "after"},
]


def _id(options: dict) -> str:
    return "-".join(f"{key}={value}" for key, value in options.items()) or "torch"


@pytest.mark.parametrize("options", ERF_SPELLINGS, ids=_id)
def test_erf_spellings_become_com_microsoft_gelu_below_opset_20(options):
    assert _fused(gelu_erf(**options)) == ("com.microsoft", "Gelu")


@pytest.mark.parametrize("options", TANH_SPELLINGS, ids=_id)
def test_tanh_spellings_become_com_microsoft_fast_gelu_below_opset_20(options):
    assert _fused(gelu_tanh(**options)) == ("com.microsoft", "FastGelu")


@pytest.mark.parametrize(("builder", "approximate"), [(gelu_erf, "none"), (gelu_tanh, "tanh")])
def test_opset_20_uses_the_standard_gelu(builder, approximate):
    check = check_pass(builder(opset=20), FuseGelu(), feeds=FEEDS)
    (node,) = list(check.model.graph)
    assert (node.domain, node.op_type) == ("", "Gelu")
    assert node.attributes["approximate"].as_string() == approximate
    assert "com.microsoft" not in check.model.opset_imports


def test_com_microsoft_domain_is_imported_once():
    check = check_pass(gelu_erf(), FuseGelu(), feeds=FEEDS)
    assert check.model.opset_imports["com.microsoft"] == 1
    assert [entry.domain for entry in check.proto.opset_import].count("com.microsoft") == 1


def test_symbolic_batch_dimension_fuses():
    model = gelu_tanh(shape=("batch", 32))
    check = check_pass(model, FuseGelu(), feeds=FEEDS)
    assert op_types(check.model) == ["FastGelu"]


def test_constants_within_the_relative_tolerance_fuse():
    # Exporters print √2 as 1.4142135 and √(2/π) as 0.7978846: within 1e-4 relative.
    assert _fused(gelu_erf(scale=1.4142135)) == ("com.microsoft", "Gelu")
    assert _fused(gelu_tanh(scale=0.7978846, cubic=0.0447150)) == ("com.microsoft", "FastGelu")


def _refused(model: onnx.ModelProto, caplog, reason: str) -> None:
    with caplog.at_level(logging.INFO, logger="qgraph.passes.infrastructure"):
        check = check_pass(model, FuseGelu(), feeds=FEEDS, expect_modified=False)
    assert not {"Gelu", "FastGelu"} & set(op_types(check.model))
    messages = " | ".join(record.getMessage() for record in caplog.records)
    assert reason in messages, messages


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (gelu_erf(scale=1.5), "the divisor of x before Erf is 1.5"),
        (gelu_erf(multiply_by_inverse=True, scale=1.5), "the factor of x before Erf"),
        (gelu_erf(one=2.0), "the constant added to Erf"),
        (gelu_tanh(cubic=0.044), "the factor of x³"),
        (gelu_tanh(scale=0.8), "√(2/π)"),
        (gelu_erf(x_fan_out_from_inside=True), "(fan-out)"),
    ],
    ids=["erf-divisor", "erf-factor", "erf-one", "tanh-cubic", "tanh-scale", "erf-fan-out"],
)
def test_near_gelus_and_fan_out_are_refused(model, reason, caplog):
    _refused(model, caplog, reason)


def test_a_cube_that_is_not_x_cubed_is_refused(caplog):
    model = gelu_tanh(cube="pow")
    three = next(tensor for tensor in model.graph.initializer if tensor.name == "three")
    three.CopyFrom(onnx.numpy_helper.from_array(np.float32(2.0), "three"))
    _refused(model, caplog, "the exponent of x³")


def test_a_half_that_is_not_a_half_is_refused(caplog):
    model = gelu_erf()
    half = next(tensor for tensor in model.graph.initializer if tensor.name == "half")
    half.CopyFrom(onnx.numpy_helper.from_array(np.float32(0.25), "half"))
    _refused(model, caplog, "the factor 0.5")


def test_a_product_with_another_tensor_is_refused(caplog):
    nodes = [
        onnx.helper.make_node("Div", ["x", "root"], ["scaled"]),
        onnx.helper.make_node("Erf", ["scaled"], ["erf"]),
        onnx.helper.make_node("Add", ["erf", "one"], ["total"]),
        onnx.helper.make_node("Mul", ["z", "total"], ["y"]),
    ]
    value = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [3, 32])  # noqa: E731
    graph = onnx.helper.make_graph(
        nodes,
        "not_gelu",
        [value("x"), value("z")],
        [value("y")],
        [
            onnx.numpy_helper.from_array(np.float32(1.4142135), "root"),
            onnx.numpy_helper.from_array(np.float32(1.0), "one"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    feeds = dict(FEEDS, z=FEEDS["x"][::-1].copy())
    with caplog.at_level(logging.INFO, logger="qgraph.passes.infrastructure"):
        check = check_pass(model, FuseGelu(), feeds=feeds, expect_modified=False)
    assert "Erf" in op_types(check.model)
    assert "something other than x" in caplog.text

"""The MobileNetV3 stand-in: torchvision's layouts and parameter counts, and every spelling computes the same."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from qgraph import runtime
from qgraph.models.common import count_parameters
from qgraph.models.mobilenet_v3 import HARDSWISH_SPELLINGS, build_mobilenet_v3


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def _logits(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.create_session(model), {"input": batch})["logits"]


@pytest.mark.parametrize(("layout", "parameters"),
                         [("mobilenet_v3_large", 5_483_032), ("mobilenet_v3_small", 2_542_856)])
def test_imagenet_layouts_have_torchvisions_parameter_counts(layout, parameters):
    model = build_mobilenet_v3(layout)
    assert count_parameters(model) == parameters
    onnx.checker.check_model(model, full_check=True)
    (graph_input,) = model.graph.input
    assert [dim.dim_param or dim.dim_value for dim in graph_input.type.tensor_type.shape.dim] == ["batch", 3, 224, 224]


def test_large_layout_structure():
    model = build_mobilenet_v3("mobilenet_v3_large")
    ops = _ops(model)
    depthwise = [node for node in model.graph.node if node.op_type == "Conv"
                 and next(attribute.i for attribute in node.attribute if attribute.name == "group") > 1]
    assert len(depthwise) == 15
    kernels = Counter(next(tuple(a.ints) for a in node.attribute if a.name == "kernel_shape") for node in depthwise)
    assert kernels == {(3, 3): 9, (5, 5): 6}
    assert ops["GlobalAveragePool"] == 8 + 1  # eight SE blocks and the head
    assert ops["HardSigmoid"] == 8  # the SE gates
    # HardSwish: stem, 9 HS blocks with expansion (expand and depthwise) = 18, head conv, classifier
    assert ops["HardSwish"] == 1 + 18 + 1 + 1
    assert ops["BatchNormalization"] == ops["Conv"] - 16  # the SE convolutions have biases, no BatchNorm


@pytest.mark.parametrize("spelling", HARDSWISH_SPELLINGS)
def test_hardswish_spellings_and_folding_compute_the_same(spelling):
    batch = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    reference = _logits(build_mobilenet_v3("tiny"), batch)
    assert np.abs(reference).max() > 1e-3
    for fold in (False, True):
        model = build_mobilenet_v3("tiny", hardswish=spelling, fold_batch_norm=fold)
        onnx.checker.check_model(model, full_check=True)
        ops = _ops(model)
        assert ("BatchNormalization" in ops) is not fold
        assert ("HardSwish" in ops) is (spelling == "op")
        np.testing.assert_allclose(_logits(model, batch), reference, rtol=1e-4, atol=1e-5)


def test_spellings_use_the_exporters_operators():
    hardsigmoid = _ops(build_mobilenet_v3("tiny", hardswish="hardsigmoid"))
    relu6 = _ops(build_mobilenet_v3("tiny", hardswish="relu6"))
    hardswishes = _ops(build_mobilenet_v3("tiny"))["HardSwish"]
    gates = _ops(build_mobilenet_v3("tiny"))["HardSigmoid"]
    assert hardsigmoid["HardSigmoid"] == hardswishes + gates
    assert relu6["Div"] == hardswishes and relu6["Clip"] == hardswishes + _ops(build_mobilenet_v3("tiny"))["Clip"]


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="layout"):
        build_mobilenet_v3("mobilenet_v4")
    with pytest.raises(ValueError, match="HardSwish spelling"):
        build_mobilenet_v3("tiny", hardswish="swish")

"""Reference models: valid ONNX, run in onnxruntime, and have the structure the passes are meant to meet."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qgraph.models.common import count_parameters
from qgraph.models.mobilenet_v2 import build_mobilenet_v2
from qgraph.models.resnet import ResNetLayout, build_resnet
from qgraph.models.vit import ViTLayout, build_vit
from qgraph.runtime import create_session

BUILDERS = {"resnet": build_resnet, "mobilenet_v2": build_mobilenet_v2, "vit": build_vit}

#: (builder, layout) → (input shape, classes, parameter range)
VARIANTS = {
    ("resnet", "small"): ((1, 28, 28), 10, (300_000, 700_000)),
    ("resnet", "resnet18"): ((3, 224, 224), 1000, (11_689_512, 11_689_512)),  # torchvision's count
    ("mobilenet_v2", "small"): ((1, 28, 28), 10, (80_000, 400_000)),
    ("mobilenet_v2", "mobilenet_v2"): ((3, 224, 224), 1000, (3_504_872, 3_504_872)),  # torchvision's count
    ("vit", "small"): ((1, 28, 28), 10, (80_000, 700_000)),
    ("vit", "vit_tiny"): ((3, 224, 224), 1000, (5_500_000, 5_800_000)),
}




@functools.cache
def _built(family: str, layout: str) -> bytes:
    """Each variant is built once per module (resnet18 at 224 included); tests get a fresh copy they may edit."""
    return BUILDERS[family](layout).SerializeToString()


def built(family: str, layout: str) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(_built(family, layout))


def _variant_id(key) -> str:
    return f"{key[0]}-{key[1]}"


@pytest.fixture(params=list(VARIANTS), ids=_variant_id)
def variant(request):
    family, layout = request.param
    return family, layout, built(family, layout)




def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def test_valid_onnx_with_the_agreed_interface(variant):
    _, layout, model = variant
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].domain == "" and model.opset_import[0].version == 17
    assert model.ir_version in (8, 9)
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert graph_input.name == "input" and graph_output.name == "logits"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph_output.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_runs_in_onnxruntime_with_symbolic_batch(variant):
    family, layout, model = variant
    shape, classes, _ = VARIANTS[(family, layout)]
    batch = 3 if shape[1] == 28 else 1
    session = create_session(model)
    images = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    (logits,) = session.run(["logits"], {"input": images})
    assert logits.shape == (batch, classes)
    assert np.isfinite(logits).all()
    assert not np.allclose(logits[0], logits[-1]) or batch == 1  # depends on the input
    if batch > 1:
        (single,) = session.run(["logits"], {"input": images[:1]})
        np.testing.assert_allclose(single[0], logits[0], rtol=1e-4, atol=1e-4)


def test_parameter_counts(variant):
    family, layout, model = variant
    low, high = VARIANTS[(family, layout)][2]
    assert low <= count_parameters(model) <= high


def test_convolutional_models_keep_inference_batchnorm(variant):
    family, _, model = variant
    batch_norms = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    if family == "vit":
        assert not batch_norms
        return
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(batch_norms) == len(convs)  # every conv is followed by its BN
    values = _initializers(model)
    for node in batch_norms:
        assert all(attribute.name != "training_mode" or attribute.i == 0 for attribute in node.attribute)
        assert len(node.output) == 1
        np.testing.assert_array_equal(values[node.input[1]], 1.0)  # gamma
        np.testing.assert_array_equal(values[node.input[2]], 0.0)  # beta
        np.testing.assert_array_equal(values[node.input[3]], 0.0)  # running mean
        np.testing.assert_array_equal(values[node.input[4]], 1.0)  # running variance


def test_conv_weights_are_he_initialised(variant):
    _, _, model = variant
    values = _initializers(model)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    large = [values[node.input[1]] for node in convs if values[node.input[1]].size >= 4096]
    for weight in large:  # std of N(0, 2 / fan_in) within 10%
        fan_in = np.prod(weight.shape[1:])
        assert abs(weight.std() - np.sqrt(2.0 / fan_in)) < 0.1 * np.sqrt(2.0 / fan_in)


def test_residual_adds_join_two_computed_branches(variant):
    family, layout, model = variant
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    residuals = [node for node in model.graph.node
                 if node.op_type == "Add" and not set(node.input) & initializer_names]
    expected = {
        ("resnet", "small"): 1 + 2 + 2, ("resnet", "resnet18"): 8,
        ("mobilenet_v2", "small"): 5, ("mobilenet_v2", "mobilenet_v2"): 10,
        ("vit", "small"): 2 * 4, ("vit", "vit_tiny"): 2 * 12,  # attention and MLP residual per block
    }[(family, layout)]
    assert len(residuals) == expected


def test_resnet_downsample_shortcuts():
    model = built("resnet", "resnet18")
    downsample = [node for node in model.graph.node if node.name.endswith("_downsample")]
    assert len(downsample) == 3
    assert all(dict((a.name, a.ints) for a in node.attribute)["kernel_shape"] == [1, 1] for node in downsample)
    assert _ops(model)["MaxPool"] == 1 and _ops(model)["GlobalAveragePool"] == 1 and _ops(model)["Gemm"] == 1


@pytest.mark.parametrize("layout", ["small", "mobilenet_v2"])
def test_mobilenet_depthwise_convs_and_relu6_clip(layout):
    model = built("mobilenet_v2", layout)
    values = _initializers(model)
    depthwise = [node for node in model.graph.node if node.op_type == "Conv" and node.name.endswith("_depthwise")]
    assert depthwise
    for node in depthwise:
        group = next(attribute.i for attribute in node.attribute if attribute.name == "group")
        weight = values[node.input[1]]
        assert weight.shape[1] == 1 and group == weight.shape[0] > 1  # one 3x3 filter per channel
    clips = [node for node in model.graph.node if node.op_type == "Clip"]
    expands = [node for node in model.graph.node if node.op_type == "Conv" and node.name.endswith("_expand")]
    assert len(clips) == 2 + len(depthwise) + len(expands)  # stem, head, and per block expand (t > 1) + depthwise
    for node in clips:
        assert len(node.input) == 3
        assert float(values[node.input[1]]) == 0.0 and float(values[node.input[2]]) == 6.0


@pytest.mark.parametrize("layout", ["small", "vit_tiny"])
def test_vit_structure(layout):
    model = built("vit", layout)
    ops = _ops(model)
    depth = {"small": 4, "vit_tiny": 12}[layout]
    assert ops["LayerNormalization"] == 2 * depth + 1
    assert ops["Softmax"] == depth and ops["Erf"] == depth
    assert ops["MatMul"] == depth * (4 + 2 + 2)  # q, k, v, output, two attention products, two MLP layers
    assert ops["Conv"] == 1 and ops["Gemm"] == 1 and "BatchNormalization" not in ops
    assert "position_embedding" in _initializers(model)


def test_vit_gelu_matches_erf_formula():
    model = built("vit", "small")
    from math import erf as error_function
    from math import sqrt

    # The first MLP activation: Div → Erf → Add → Mul(x, ·) → Mul(·, 0.5), evaluated on a probe input.
    def consumer(value: str, op_type: str) -> onnx.NodeProto:
        return next(node for node in model.graph.node if node.op_type == op_type and value in node.input)

    div = next(node for node in model.graph.node if node.op_type == "Div")
    erf = consumer(div.output[0], "Erf")
    add = consumer(erf.output[0], "Add")
    product = consumer(add.output[0], "Mul")
    assert div.input[0] in product.input
    gelu = consumer(product.output[0], "Mul")
    for name in (div.input[0], gelu.output[0]):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = create_session(model)
    images = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
    _, before, after = session.run(None, {"input": images})
    expected = np.vectorize(lambda v: v * 0.5 * (1.0 + error_function(v / sqrt(2.0))))(before.astype(np.float64))
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-5)


def test_builders_are_seeded_and_parameterised():
    first, again, other = build_mobilenet_v2("small", seed=3), build_mobilenet_v2("small", seed=3), \
        build_mobilenet_v2("small", seed=4)
    assert first.SerializeToString() == again.SerializeToString()
    assert first.SerializeToString() != other.SerializeToString()
    custom = build_resnet(ResNetLayout(16, 3, 1, False, (16, 32), (1, 1)), input_shape=(3, 32, 32), num_classes=7)
    onnx.checker.check_model(custom, full_check=True)
    (logits,) = create_session(custom).run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})
    assert logits.shape == (2, 7)
    vit = build_vit(ViTLayout(7, 32, 1, 2, 2.0), input_shape=(1, 28, 28), num_classes=5)
    (logits,) = create_session(vit).run(None, {"input": np.zeros((2, 1, 28, 28), np.float32)})
    assert logits.shape == (2, 5)


@pytest.mark.parametrize("call, message", [
    (lambda: build_resnet("resnet50"), "unknown ResNet layout"),
    (lambda: build_mobilenet_v2("small", input_shape=(28, 28)), "channels, height, width"),
    (lambda: build_vit("small", input_shape=(1, 30, 30)), "multiple of the patch size"),
    (lambda: ViTLayout(4, 30, 1, 4, 2.0), "not divisible"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()

"""The fake-quant training graph: same forward values as the QDQ graph, STE gradients, 4-bit bounds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest

from qgraph.qat import build_fake_quant_graph
from qgraph.train import TrainingConfig
from qgraph.train.artifacts import build_training_artifacts
from qgraph.train.session import TrainingSession
from tests.ptq.small_models import calibration_batches
from tests.qat.helpers import quantized, two_layer_mlp


def _quantizer_bounds(model: onnx.ModelProto) -> list[tuple[float, float]]:
    """The (lower, upper) clip bounds of every quantizer of a fake-quant graph, in code units."""
    constants = {node.output[0]: onnx.helper.get_attribute_value(node.attribute[0])
                 for node in model.graph.node if node.op_type == "Constant"}
    return [(float(constants[node.input[1]]), float(constants[node.input[2]])) for node in model.graph.node
            if node.op_type == "Clip" and node.output[0].endswith(".qat_clipped")]


def _run(model: onnx.ModelProto, feeds) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("learn_scales", [True, False])
def test_forward_matches_the_qdq_graph(learn_scales):
    float_model, result = quantized()
    graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model,
                                   learn_scales=learn_scales)
    onnx.checker.check_model(graph.model)
    ops = [node.op_type for node in graph.model.graph.node]
    # No ONNX-domain Q/DQ: onnxruntime-training would fuse such pairs into its slow FakeQuant.
    assert not {node.op_type for node in graph.model.graph.node if node.domain in ("", "ai.onnx")} & {
        "QuantizeLinear", "DequantizeLinear"}
    assert "FakeQuant" not in ops  # its kernel rounds element by element; the Clip/Add/Sub composition is faster
    # Eight activation pairs and four weights; the pairs after MaxPool and Flatten see values already on their
    # group's grid (the same scale as their input's pair), so the training graph reads those tensors directly.
    passed_through = ops.count("PassThrough")
    assert passed_through == (5 if learn_scales else 0)  # learnable 8-bit activations but the graph input's
    assert len(_quantizer_bounds(graph.model)) + passed_through == 6 + 4
    identities = {node.input[0] for node in graph.model.graph.node if node.op_type == "Identity"}
    on_grid = {node.input[0] for node in result.qdq_model.graph.node if node.op_type == "QuantizeLinear"
               and {producer.op_type for producer in result.qdq_model.graph.node
                    if node.input[0] in producer.output} & {"MaxPool", "Flatten"}}
    assert len(on_grid) == 2 and on_grid <= identities
    assert sum(len(quantizer.tensors) for quantizer in graph.activations) == 8  # all still exported
    # One learnable scale per scale group (MaxPool and Flatten share their input's scale).
    assert len(graph.activations) == 6
    assert len(graph.activation_scale_parameters) == (6 if learn_scales else 0)
    feeds = calibration_batches(1, 16, seed=7)[0]
    expected = _run(result.qdq_model, feeds)
    actual = _run(graph.model, feeds)
    # Only the float bias differs from its int32 form (half an accumulator step); one activation code may flip.
    coarsest = max(quantizer.scale for quantizer in graph.activations)
    assert np.max(np.abs(actual - expected)) <= coarsest


def test_four_bit_weights_use_the_spec_bounds():
    float_model, result = quantized(weight_bits=4)
    graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model)
    assert {(weight.qmin, weight.qmax) for weight in graph.weights} == {(-7, 7)}
    bounds = set(_quantizer_bounds(graph.model))
    # Weights clip to the open cell (-7.5, 7.5): the float32 neighbours inside, which round to ±7.
    inside = (float(np.nextafter(np.float32(-7.5), np.float32(0))), float(np.nextafter(np.float32(7.5), np.float32(0))))
    assert inside in bounds
    feeds = calibration_batches(1, 8, seed=3)[0]
    coarsest = max(quantizer.scale for quantizer in graph.activations)
    assert np.max(np.abs(_run(graph.model, feeds) - _run(result.qdq_model, feeds))) <= coarsest


def _gradients(model, graph, feeds, tmp_path):
    config = TrainingConfig(loss="mse", trainable=graph.trainable, learning_rate=1e-3, threads=1)
    artifacts = build_training_artifacts(graph.model, tmp_path, config)
    session = TrainingSession(artifacts, config, artifacts.checkpoint)
    target = np.zeros((feeds["input"].shape[0], 3), np.float32)
    session.forward_backward(feeds, target)
    return {name: session.state.parameters[name].grad for name in graph.trainable}


def test_straight_through_gradient_is_zero_where_clipped(tmp_path):
    generator = np.random.default_rng(0)
    first = generator.uniform(0.5, 1.0, (4, 5))
    second = generator.standard_normal((5, 3))
    model = two_layer_mlp(first, second)
    calibration = [{"input": generator.uniform(-1, 1, (16, 4)).astype(np.float32)}]
    float_model, result = quantized(model, batches=calibration)
    # Shrink the grid of the hidden activation to [0, 0.255] (scale 1e-3, zero point 0).
    qdq = result.qdq_model
    scale_name = next(node.input[1] for node in qdq.graph.node
                      if node.op_type == "QuantizeLinear" and node.input[0] == "activated")
    for tensor in qdq.graph.initializer:
        if tensor.name == scale_name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.array(1e-3, np.float32), scale_name))
    # The latent first weight holds one entry far outside its channel's grid: the weight quantizer clips it.
    latent = onnx.ModelProto()
    latent.CopyFrom(float_model)
    clipped_first = first.copy()
    clipped_first[0, 0] = 50.0
    latent.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(clipped_first.astype(np.float32), "w1"))
    graph = build_fake_quant_graph(qdq, result.plan, result.parameters, float_model=latent)

    small = {"input": np.full((1, 4), 0.01, np.float32)}  # hidden ≈ 0.03: inside the activation grid
    gradients = _gradients(model, graph, small, tmp_path / "in")
    assert gradients["w1"][0, 0] == 0.0  # clipped weight: no gradient
    assert np.count_nonzero(gradients["w1"]) == gradients["w1"].size - 1
    assert np.count_nonzero(gradients["w2"]) > 0

    # hidden ≈ 1.5 for every unit: the activation quantizer clips every element, so nothing flows back to the
    # first weight, while the second still learns from the saturated activation.
    large = {"input": np.full((1, 4), 0.5, np.float32)}
    gradients = _gradients(model, graph, large, tmp_path / "out")
    assert np.all(gradients["w1"] == 0.0)
    assert np.count_nonzero(gradients["w2"]) > 0
    # LSQ: the scale gradient of a clipped element is (qmax - z) · dL/dy, non-zero.
    activation = graph.activation_of("activated").log_scale
    assert gradients[activation] != 0.0


@pytest.mark.parametrize(("zero_point", "qmin", "qmax"), [(0, -127, 127), (128, 0, 255), (0, -7, 7), (3, -128, 127)])
def test_rounding_composition_is_quantize_linear_bit_for_bit(zero_point, qmin, qmax):
    """Clip to the cell, then (v + 1.5·2²³) − 1.5·2²³: QuantizeLinear's round-half-to-even and saturation."""
    from qgraph.qat.fake_quant_graph import _Builder

    builder = _Builder(onnx.ModelProto(), 1.0)
    nodes = builder.rounding_nodes("t", "v", zero_point, qmin, qmax, "codes")
    graph = onnx.helper.make_graph(
        builder.prologue + nodes, "rounding", [onnx.helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("codes", onnx.TensorProto.FLOAT, [None])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    ties = np.arange(-300, 300, dtype=np.float32) + np.float32(0.5)
    generator = np.random.default_rng(0)
    values = np.concatenate([ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(1e9)),
                             generator.uniform(-400, 400, 4000).astype(np.float32),
                             np.array([0.0, -0.0, 1e30, -1e30, 3e38, -3e38], np.float32)])
    actual = _run(model, {"v": values})
    expected = np.clip(np.rint(values.astype(np.float64)) + zero_point, qmin, qmax) - zero_point
    np.testing.assert_array_equal(actual, expected.astype(np.float32))


def test_pass_through_quantizer_trains_like_the_differentiable_composition(tmp_path, monkeypatch):
    """QuantizeLinear → DequantizeLinear → PassThrough with its registered gradient gives the STE and LSQ
    gradients that onnxruntime derives for Div → Clip → round → Mul."""
    from qgraph.qat import fake_quant_graph

    float_model, result = quantized()
    feeds = calibration_batches(1, 8, seed=5)[0]
    target = np.random.default_rng(2).standard_normal((8, 5)).astype(np.float32)
    gradients, outputs = {}, {}
    for fast in (True, False):
        monkeypatch.setattr(fake_quant_graph, "_PASS_THROUGH_ACTIVATIONS", fast)
        graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model)
        assert ("PassThrough" in {node.op_type for node in graph.model.graph.node}) == fast
        config = TrainingConfig(loss="mse", trainable=graph.trainable, learning_rate=1e-3, threads=1)
        artifacts = build_training_artifacts(graph.model, tmp_path / str(fast), config)
        session = TrainingSession(artifacts, config, artifacts.checkpoint)
        _, outputs[fast] = session.forward_backward(feeds, target)
        gradients[fast] = {name: np.asarray(session.state.parameters[name].grad) for name in graph.trainable}
    np.testing.assert_array_equal(outputs[True], outputs[False])
    assert gradients[True].keys() == gradients[False].keys()
    for name, gradient in gradients[True].items():
        reference = gradients[False][name]
        assert np.count_nonzero(reference) > 0, name
        np.testing.assert_allclose(gradient, reference, rtol=1e-3, atol=1e-6 * np.max(np.abs(reference)),
                                   err_msg=name)

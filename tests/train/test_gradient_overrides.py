"""The Clip gradient qgraph registers with onnxruntime-training: the built-in's inclusive in-range mask."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qgraph.train import TrainingConfig
from qgraph.train.artifacts import build_training_artifacts
from qgraph.train.session import TrainingSession


def test_clip_gradient_passes_inside_and_on_the_bounds_only(tmp_path):
    weight = np.array([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 1.0000001, 7.0], np.float32)
    nodes = [
        helper.make_node("Mul", ["input", "w"], ["product"]),
        helper.make_node("Clip", ["product", "low", "high"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "clip", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.float32(-1.0), "low"),
         numpy_helper.from_array(np.float32(1.0), "high")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    config = TrainingConfig(loss="mse", trainable=["w"], learning_rate=1e-3, threads=1)
    artifacts = build_training_artifacts(model, tmp_path, config)
    session = TrainingSession(artifacts, config, artifacts.checkpoint)
    target = np.full((1, 8), 2.0, np.float32)
    session.forward_backward({"input": np.ones((1, 8), np.float32)}, target)
    gradient = np.asarray(session.state.parameters["w"].grad)
    # d mean((clip(w) - 2)²)/dw = (clip(w) - 2) / 4 where -1 ≤ w ≤ 1 (bounds included), 0 where clipped.
    inside = (weight >= -1.0) & (weight <= 1.0)
    expected = np.where(inside, (np.clip(weight, -1, 1) - 2.0) / 4.0, 0.0).astype(np.float32)
    np.testing.assert_allclose(gradient, expected, rtol=1e-6)
    assert np.count_nonzero(gradient) == 5  # -1, -0.25, 0, 0.5 and 1

"""Small float models for the post-training quantization tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def residual_cnn(seed: int = 0, channels: int = 8, classes: int = 5) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu-Conv-Add(residual)-Relu-GlobalAveragePool-Flatten-Gemm on 1×3×16×16 inputs."""
    generator = np.random.default_rng(seed)

    def weight(*shape):
        fan_in = int(np.prod(shape[1:]))
        return generator.standard_normal(shape) * np.sqrt(2.0 / fan_in)

    initializers = [
        _init("conv1.weight", weight(channels, 3, 3, 3)),
        _init("conv1.bias", generator.standard_normal(channels) * 0.1),
        _init("conv2.weight", weight(channels, channels, 3, 3)),
        _init("conv2.bias", generator.standard_normal(channels) * 0.1),
        _init("conv3.weight", weight(channels, channels, 3, 3)),
        _init("conv3.bias", generator.standard_normal(channels) * 0.1),
        _init("fc.weight", weight(classes, channels)),
        _init("fc.bias", generator.standard_normal(classes) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "conv3.weight", "conv3.bias"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Add", ["c3", "p1"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "residual_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def calibration_batches(count: int = 4, batch: int = 8, seed: int = 1):
    generator = np.random.default_rng(seed)
    return [{"input": generator.standard_normal((batch, 3, 16, 16)).astype(np.float32)} for _ in range(count)]

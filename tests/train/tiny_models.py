"""Tiny models and data for the training tests: a small CNN with one BatchNormalization, and Fashion-MNIST slices."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qgraph.data import load_fashion_mnist


def _initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def tiny_cnn(*, num_classes: int = 10, seed: int = 0, channels: int = 4) -> onnx.ModelProto:
    """Conv3x3/2 → BatchNorm → Relu → Conv3x3/2 → Relu → GlobalAveragePool → Flatten → Gemm, on 1×28×28 input."""
    generator = np.random.default_rng(seed)
    hidden = 2 * channels
    nodes = [
        helper.make_node("Conv", ["input", "conv1_w", "conv1_b"], ["c1"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b1"]),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2_w", "conv2_b"], ["c2"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    initializers = [
        _initializer("conv1_w", (generator.standard_normal((channels, 1, 3, 3)) * np.sqrt(2 / 9)).astype(np.float32)),
        _initializer("conv1_b", np.zeros(channels, np.float32)),
        _initializer("bn_scale", np.ones(channels, np.float32)),
        _initializer("bn_bias", np.zeros(channels, np.float32)),
        _initializer("bn_mean", np.zeros(channels, np.float32)),
        _initializer("bn_var", np.ones(channels, np.float32)),
        _initializer("conv2_w", (generator.standard_normal((hidden, channels, 3, 3))
                                 * np.sqrt(2 / (9 * channels))).astype(np.float32)),
        _initializer("conv2_b", np.zeros(hidden, np.float32)),
        _initializer("fc_w", (generator.standard_normal((num_classes, hidden))
                              * np.sqrt(1 / hidden)).astype(np.float32)),
        _initializer("fc_b", np.zeros(num_classes, np.float32)),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_regressor(seed: int = 0) -> onnx.ModelProto:
    """A one-layer MLP ``input[batch, 8] → Gemm → output[batch, 3]`` for the MSE loss."""
    generator = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w", "b"], ["output"], transB=1)], "tiny_regressor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [_initializer("w", (generator.standard_normal((3, 8)) * 0.1).astype(np.float32)),
         _initializer("b", np.zeros(3, np.float32))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fashion_batches(count: int, batch_size: int, *, split: str = "train", offset: int = 0) -> list:
    """``count`` samples of Fashion-MNIST as a list of ``({"input": images}, labels)`` batches."""
    images, labels = load_fashion_mnist(split, limit=offset + count, normalization="standard")
    images, labels = images[offset:], labels[offset:]
    return [({"input": images[start:start + batch_size]}, labels[start:start + batch_size])
            for start in range(0, count, batch_size)]

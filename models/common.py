"""Shared graph-building helpers for the reference models.

The reference models are written node by node with :mod:`onnx.helper`, the way an exporter would write them, so that
the canonicalisation passes (BatchNorm folding, bias merging) and the quantizer meet the same patterns they meet in
real exported files. :class:`GraphBuilder` keeps the bookkeeping out of the architecture files: it hands out unique
tensor names, owns a seeded :class:`numpy.random.Generator` and collects nodes and initializers until
:meth:`GraphBuilder.build_model` wraps them into an ``onnx.ModelProto``.

Initialisation (seeded, so a given seed always yields the same bytes):

- convolution weights: He/Kaiming normal for ReLU networks, ``W ~ N(0, 2 / fan_in)`` with
  ``fan_in = (in_channels / group) · kernel_height · kernel_width``; a depthwise 3x3 kernel has ``fan_in = 9``;
- BatchNormalization: ``gamma = 1, beta = 0, running_mean = 0, running_var = 1`` (inference form, no
  ``training_mode``), so a freshly built model computes ``y = x / sqrt(1 + epsilon)``;
- dense layers (``Gemm``/``MatMul``): Glorot/Xavier uniform, ``W ~ U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``,
  biases zero;
- LayerNormalization: ``scale = 1, bias = 0``.

Every model uses opset 17 (LayerNormalization is an opset-17 operator) and IR version 8, a symbolic batch
dimension named ``"batch"``, one input named ``"input"`` and one output named ``"logits"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

OPSET_VERSION = 17
IR_VERSION = 8
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIMENSION = "batch"


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution or pooling window: ``floor((size + 2·padding - kernel) / stride) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def count_parameters(model: onnx.ModelProto, *, include_batchnorm_statistics: bool = False) -> int:
    """Number of learnable floating-point values among the initializers of ``model``'s main graph.

    BatchNormalization running mean and variance are statistics, not parameters, so they are left out unless
    ``include_batchnorm_statistics`` is set; integer initializers (Reshape shapes) and scalar constants used by
    ``Clip``, ``Div`` or ``Mul`` (values with fewer than two elements) never count.
    """
    statistics: set[str] = set()
    if not include_batchnorm_statistics:
        for node in model.graph.node:
            if node.op_type == "BatchNormalization":
                statistics.update(node.input[3:5])
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name in statistics or tensor.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        size = math.prod(tensor.dims)
        if size >= 2:
            total += size
    return total


class ProtoGraph:
    """The nodes and initializers of one graph as ONNX protos, in the order they are added."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        """Store ``array`` as the initializer ``name``; returns the name."""
        # np.array, not np.ascontiguousarray, which would turn a 0-d scalar (Clip bounds) into shape (1,)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name


class GraphBuilder(ProtoGraph):
    """Collects nodes and seeded initializers for one graph, with unique names per op type."""

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.generator = np.random.default_rng(seed)
        self._name_counts: dict[str, int] = {}
        self._constants: dict[tuple, str] = {}

    # ----------------------------------------------------------------------------------------------- naming
    def unique_name(self, stem: str) -> str:
        count = self._name_counts.get(stem, 0)
        self._name_counts[stem] = count + 1
        return f"{stem}_{count}"

    def constant(self, value: float | Sequence[int] | np.ndarray, dtype: type = np.float32) -> str:
        """A shared initializer for a constant (scalars such as Clip bounds, Reshape shapes), created once."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.add_initializer(self.unique_name("const"), array)
        return self._constants[key]

    def node(self, op_type: str, inputs: Sequence[str], *, name: str | None = None, outputs: int = 1,
             **attributes) -> str | list[str]:
        """Append one node; returns its output name (or names when ``outputs > 1``)."""
        node_name = name or self.unique_name(op_type.lower())
        output_names = [f"{node_name}_out{index}" if outputs > 1 else f"{node_name}_out" for index in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), output_names, name=node_name, **attributes))
        return output_names if outputs > 1 else output_names[0]

    # ------------------------------------------------------------------------------------ convolutional layers
    def conv(self, x: str, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
             padding: int | None = None, group: int = 1, bias: bool = False, name: str | None = None) -> str:
        """A square convolution with He-normal weights; padding defaults to ``kernel // 2`` ("same" for odd k)."""
        name = name or self.unique_name("conv")
        if in_channels % group or out_channels % group:
            raise ValueError(f"{name}: channels {in_channels}->{out_channels} not divisible by group {group}")
        padding = kernel // 2 if padding is None else padding
        fan_in = (in_channels // group) * kernel * kernel
        weight = self.generator.standard_normal((out_channels, in_channels // group, kernel, kernel))
        weight *= math.sqrt(2.0 / fan_in)
        inputs = [x, self.add_initializer(f"{name}.weight", weight.astype(np.float32))]
        if bias:
            inputs.append(self.add_initializer(f"{name}.bias", np.zeros(out_channels, np.float32)))
        return self.node("Conv", inputs, name=name, kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[padding] * 4, group=group, dilations=[1, 1])

    def batch_norm(self, x: str, channels: int, *, epsilon: float = 1e-5, name: str | None = None) -> str:
        """Inference-form BatchNormalization with identity statistics (gamma 1, beta 0, mean 0, var 1)."""
        name = name or self.unique_name("bn")
        inputs = [
            x,
            self.add_initializer(f"{name}.weight", np.ones(channels, np.float32)),
            self.add_initializer(f"{name}.bias", np.zeros(channels, np.float32)),
            self.add_initializer(f"{name}.running_mean", np.zeros(channels, np.float32)),
            self.add_initializer(f"{name}.running_var", np.ones(channels, np.float32)),
        ]
        return self.node("BatchNormalization", inputs, name=name, epsilon=epsilon, momentum=0.9)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def relu6(self, x: str) -> str:
        """ReLU6 as ``Clip(x, 0, 6)`` with the bounds as (shared) initializer inputs, as exporters write it."""
        return self.node("Clip", [x, self.constant(0.0), self.constant(6.0)])

    def conv_bn(self, x: str, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
                group: int = 1, activation: str | None = "relu", name: str | None = None) -> str:
        """Conv (no bias) → BatchNormalization → optional activation (``"relu"``, ``"relu6"`` or ``None``)."""
        name = name or self.unique_name("conv")
        y = self.conv(x, in_channels, out_channels, kernel, stride=stride, group=group, name=name)
        y = self.batch_norm(y, out_channels, name=f"{name}_bn")
        if activation == "relu":
            return self.relu(y)
        if activation == "relu6":
            return self.relu6(y)
        if activation is not None:
            raise ValueError(f"unknown activation {activation!r}")
        return y

    # ------------------------------------------------------------------------------------------ dense layers
    def glorot_uniform(self, fan_in: int, fan_out: int, shape: Sequence[int]) -> np.ndarray:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return self.generator.uniform(-limit, limit, size=tuple(shape)).astype(np.float32)

    def gemm(self, x: str, in_features: int, out_features: int, *, name: str | None = None) -> str:
        """``Gemm(x, W, b, transB=1)`` with ``W`` of shape (out, in), the form PyTorch's Linear exports to."""
        name = name or self.unique_name("fc")
        weight = self.glorot_uniform(in_features, out_features, (out_features, in_features))
        inputs = [x, self.add_initializer(f"{name}.weight", weight),
                  self.add_initializer(f"{name}.bias", np.zeros(out_features, np.float32))]
        return self.node("Gemm", inputs, name=name, alpha=1.0, beta=1.0, transB=1)

    def linear(self, x: str, in_features: int, out_features: int, *, name: str | None = None) -> str:
        """``MatMul(x, W) + b`` with ``W`` of shape (in, out): a dense layer on tensors of any rank ≥ 2."""
        name = name or self.unique_name("linear")
        weight = self.glorot_uniform(in_features, out_features, (in_features, out_features))
        y = self.node("MatMul", [x, self.add_initializer(f"{name}.weight", weight)], name=f"{name}_matmul")
        bias = self.add_initializer(f"{name}.bias", np.zeros(out_features, np.float32))
        return self.node("Add", [y, bias], name=f"{name}_add")

    def layer_norm(self, x: str, features: int, *, epsilon: float = 1e-6, name: str | None = None) -> str:
        """Opset-17 ``LayerNormalization`` over the last axis, scale 1 and bias 0."""
        name = name or self.unique_name("ln")
        inputs = [x, self.add_initializer(f"{name}.weight", np.ones(features, np.float32)),
                  self.add_initializer(f"{name}.bias", np.zeros(features, np.float32))]
        return self.node("LayerNormalization", inputs, name=name, axis=-1, epsilon=epsilon)

    def gelu_erf(self, x: str) -> str:
        """Exact GELU written as exporters do: ``x · 0.5 · (1 + Erf(x / sqrt(2)))``."""
        scaled = self.node("Div", [x, self.constant(math.sqrt(2.0))])
        erf = self.node("Erf", [scaled])
        shifted = self.node("Add", [erf, self.constant(1.0)])
        product = self.node("Mul", [x, shifted])
        return self.node("Mul", [product, self.constant(0.5)])

    # ---------------------------------------------------------------------------------------------- wrapping
    def build_model(self, output: str, *, input_shape: Sequence[int], num_classes: int, graph_name: str,
                    doc_string: str = "") -> onnx.ModelProto:
        """Wrap the collected nodes into a model with input ``input`` (batch, *input_shape) and output ``logits``."""
        if output != OUTPUT_NAME:  # the last node writes the graph output directly, no Identity
            producer = next(node for node in reversed(self.nodes) if output in node.output)
            producer.output[list(producer.output).index(output)] = OUTPUT_NAME
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIMENSION, *input_shape])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIMENSION, num_classes])],
            initializer=self.initializers,
            doc_string=doc_string,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET_VERSION)],
                                  producer_name="qgraph.models", ir_version=IR_VERSION)
        logger.debug("built %s: %d nodes, %d parameters", graph_name, len(self.nodes), count_parameters(model))
        return model


def validate_input_shape(input_shape: Sequence[int], num_classes: int) -> tuple[int, int, int]:
    """Check ``(channels, height, width)`` and the class count; returns the shape as a tuple of ints."""
    if len(input_shape) != 3 or any(int(size) <= 0 for size in input_shape):
        raise ValueError(f"input_shape must be (channels, height, width) with positive sizes, got {input_shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    channels, height, width = (int(size) for size in input_shape)
    return channels, height, width

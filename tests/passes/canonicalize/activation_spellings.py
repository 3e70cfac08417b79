"""Builders of SiLU / sigmoid-GELU and HardSwish as exporters write them, for the fusion tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qgraph.models.common import GraphBuilder

SHAPE = ["batch", 8, 5, 5]


def _wrap(builder: GraphBuilder, output: str, opset: int) -> onnx.ModelProto:
    producer = next(node for node in reversed(builder.nodes) if output in node.output)
    producer.output[list(producer.output).index(output)] = "y"
    graph = helper.make_graph(
        builder.nodes, "activation", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], initializer=builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def sigmoid_gate(alpha: float | None = None, *, swap: bool = False, opset: int = 17) -> onnx.ModelProto:
    """``x · Sigmoid(x)`` (alpha None) or ``x · Sigmoid(alpha · x)``."""
    builder = GraphBuilder()
    argument = "x" if alpha is None else builder.node("Mul", [builder.constant(alpha), "x"] if swap else
                                                      ["x", builder.constant(alpha)])
    gate = builder.node("Sigmoid", [argument])
    return _wrap(builder, builder.node("Mul", [gate, "x"] if swap else ["x", gate]), opset)


def hard_swish(spelling: str = "hard_sigmoid", *, opset: int = 14, alpha: float = 1.0 / 6.0,
               six: float = 6.0) -> onnx.ModelProto:
    """HardSwish as ``"hard_sigmoid"`` (torch.onnx < 14), ``"clip"``, ``"max_min"``, ``"min_max"``, ``"relu_min"``
    (Keras/tf2onnx ReLU6 forms, then Div 6) or ``"clip_product_first"`` (x · ReLU6(x + 3), then Mul 1/6)."""
    builder = GraphBuilder()
    if spelling == "hard_sigmoid":
        gate = builder.node("HardSigmoid", ["x"], alpha=alpha, beta=0.5)
        return _wrap(builder, builder.node("Mul", ["x", gate]), opset)
    shifted = builder.node("Add", [builder.constant(3.0), "x"])
    if spelling in ("clip", "clip_product_first"):
        relu6 = builder.node("Clip", [shifted, builder.constant(0.0), builder.constant(six)])
    elif spelling == "max_min":
        relu6 = builder.node("Min", [builder.node("Max", [shifted, builder.constant(0.0)]), builder.constant(six)])
    elif spelling == "min_max":
        relu6 = builder.node("Max", [builder.node("Min", [shifted, builder.constant(six)]), builder.constant(0.0)])
    else:
        relu6 = builder.node("Min", [builder.node("Relu", [shifted]), builder.constant(six)])
    if spelling == "clip_product_first":
        product = builder.node("Mul", [relu6, "x"])
        return _wrap(builder, builder.node("Mul", [product, builder.constant(1.0 / 6.0)]), opset)
    scaled = builder.node("Div", [relu6, builder.constant(6.0)])
    return _wrap(builder, builder.node("Mul", ["x", scaled]), opset)


def widen(model: onnx.ModelProto, scale: float = 4.0) -> dict[str, np.ndarray]:
    """Seeded inputs spread over ±3·scale, so every piece of the piecewise functions is exercised."""
    del model
    return {"x": (np.random.default_rng(0).standard_normal((2, 8, 5, 5)) * scale).astype(np.float32)}

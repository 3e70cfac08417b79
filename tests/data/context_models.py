"""A small model with a recurrent-style state input, as the data-layout tests need it.

``input [batch, 6]`` and ``state [2, batch, hidden]`` (batch on axis 1, as an LSTM's h/c) →
Transpose → Reshape → Concat → MatMul (→ Add bias) → ``output [batch, 1]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def context_model(
    hidden: int = 4, *, name: str, state_first: bool, bias: bool, weight_scale: float
) -> onnx.ModelProto:
    """The model above; ``state_first`` declares ``state`` before ``input``; weights are N(0, weight_scale²)."""
    generator = np.random.default_rng(0)
    features = 6 + 2 * hidden
    product = "product" if bias else "output"
    nodes = [
        helper.make_node("Transpose", ["state"], ["batch_first"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["batch_first", "flat_shape"], ["flat_state"]),
        helper.make_node("Concat", ["input", "flat_state"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "w"], [product]),
    ]
    initializers = [
        numpy_helper.from_array((generator.standard_normal((features, 1)) * weight_scale).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([0, 2 * hidden], np.int64), "flat_shape"),
    ]
    if bias:
        nodes.append(helper.make_node("Add", [product, "b"], ["output"]))
        initializers.append(numpy_helper.from_array(np.zeros(1, np.float32), "b"))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", hidden])]
    graph = helper.make_graph(
        nodes, name, inputs[::-1] if state_first else inputs,
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

"""Small ONNX models around BatchNormalization for the FoldBatchNorm, DecomposeBatchNorm and MergeBiasAdd tests.

BatchNorm statistics are deliberately non-trivial (signed gamma, non-zero beta and mean, variance far from one), so
that a rewrite that drops or misplaces any of them changes the outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(nodes, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(_stored(array), name) for name, array in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    # Outputs declared without a shape take the inferred one (the checker wants a shape); intermediate values stay
    # unannotated, as in a model shape inference never saw.
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


def _stored(array: np.ndarray) -> np.ndarray:
    """Floating arrays are stored as float32; integer arrays (shapes, axes) keep their type."""
    array = np.asarray(array)
    return array.astype(np.float32) if array.dtype.kind == "f" else array


def batch_norm_parameters(prefix: str, channels: int, seed: int) -> dict[str, np.ndarray]:
    """Non-trivial statistics: a fold that forgot any of them would change the outputs."""
    generator = np.random.default_rng(seed)
    return {
        f"{prefix}_gamma": generator.uniform(0.5, 2.0, channels) * generator.choice([-1, 1], channels),
        f"{prefix}_beta": generator.standard_normal(channels),
        f"{prefix}_mean": generator.standard_normal(channels),
        f"{prefix}_var": generator.uniform(0.2, 3.0, channels),
    }


def batch_norm_node(prefix: str, source: str, output: str, **attributes) -> onnx.NodeProto:
    inputs = [source] + [f"{prefix}_{name}" for name in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [output], name=prefix, epsilon=1e-3, **attributes)


def weights(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * 0.5


def with_element_type(model: onnx.ModelProto, numpy_type: type, onnx_type: int) -> onnx.ModelProto:
    """The same model with every floating initializer, input and output in another floating element type."""
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.dtype.kind == "f":
            initializer.CopyFrom(numpy_helper.from_array(array.astype(numpy_type), initializer.name))
    for value in list(model.graph.input) + list(model.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx_type
    return model

"""Models for the sensitivity/fallback tests and benchmark: one layer whose int8 quantization destroys the output.

``outlier_mlp`` is ``x → fc1 → Relu → fc2 → Relu → fc3 → logits`` (Gemm, transB=1) on 16 features. fc1 never
activates its output feature 0 (zero weights, bias −1, so the Relu keeps it at exactly 0) and fc2 reads that dead
feature with weight ``outlier`` in every output channel, next to ordinary weights of about 0.25. Per output channel
(and per tensor) the int8 scale is ``outlier / 127``: with ``outlier = 1000`` every ordinary weight rounds to 0 and
fc2's output collapses to its bias — the whole model's output with it — while the FP32 model never notices the
outlier (it multiplies a zero). ``mild`` scales fc3's weights the same way with a smaller outlier, so that layer is
hurt but not destroyed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 16
HIDDEN = 32
CLASSES = 8


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def outlier_mlp(outlier: float = 1000.0, mild_outlier: float | None = None, seed: int = 0) -> onnx.ModelProto:
    """The MLP above; ``mild_outlier`` also gives fc3 a dead input feature with that weight."""
    generator = np.random.default_rng(seed)

    def weight(rows: int, columns: int) -> np.ndarray:
        return generator.standard_normal((rows, columns)) * np.sqrt(2.0 / columns)

    fc1_weight, fc1_bias = weight(HIDDEN, FEATURES), generator.standard_normal(HIDDEN) * 0.1
    fc1_weight[0] = 0.0
    fc1_bias[0] = -1.0  # feature 0 of fc1's output is Relu(-1) = 0 for every input
    fc1_weight[1] = 0.0
    fc1_bias[1] = -1.0  # and so is feature 1 (read by fc3 through fc2's feature 1, below)
    fc2_weight, fc2_bias = weight(HIDDEN, HIDDEN), generator.standard_normal(HIDDEN) * 0.1
    fc2_weight[:, 0] = outlier
    fc2_weight[1] = 0.0
    fc2_bias[1] = -1.0  # fc2's output feature 1 is dead too
    fc3_weight, fc3_bias = weight(CLASSES, HIDDEN), generator.standard_normal(CLASSES) * 0.1
    if mild_outlier is not None:
        fc3_weight[:, 1] = mild_outlier
    initializers = [
        _init("fc1.weight", fc1_weight), _init("fc1.bias", fc1_bias),
        _init("fc2.weight", fc2_weight), _init("fc2.bias", fc2_bias),
        _init("fc3.weight", fc3_weight), _init("fc3.bias", fc3_bias),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "fc2.weight", "fc2.bias"], ["h2"], transB=1, name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "fc3.weight", "fc3.bias"], ["logits"], transB=1, name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def feature_batches(count: int = 4, batch: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(seed)
    return [{"input": generator.standard_normal((batch, FEATURES)).astype(np.float32)} for _ in range(count)]

"""Shared fixtures of the QAT tests: a calibrated tiny residual CNN and synthetic labelled data."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qgraph.calibrate.driver import CalibrationConfig
from qgraph.data import dataset_from_arrays
from qgraph.ptq import QuantizeOptions, quantize
from qgraph.targets import TargetOptions
from tests.ptq.small_models import calibration_batches, residual_cnn

CLASSES = 5


def quantized(model: onnx.ModelProto | None = None, *, weight_bits: int = 8, per_channel: bool = True, batches=None):
    """(float model, QuantizeResult with the QDQ graph) for ``model`` (default: the tiny residual CNN)."""
    model = model or residual_cnn(classes=CLASSES)
    options = QuantizeOptions(
        target_options=TargetOptions(format="qoperator", weight_bits=weight_bits, per_channel=per_channel,
                                     reduce_range="off"),
        calibration=CalibrationConfig(method="minmax"),
    )
    result = quantize(ir.serde.deserialize_model(model), batches or calibration_batches(), options, lower=False)
    return model, result


def labelled_data(samples: int = 128, seed: int = 0, *, teacher: onnx.ModelProto | None = None):
    """Inputs of the tiny CNN and labels: the teacher's argmax (learnable), or random classes."""
    generator = np.random.default_rng(seed)
    inputs = generator.standard_normal((samples, 3, 16, 16)).astype(np.float32)
    if teacher is not None:
        from qgraph import runtime

        logits = runtime.run(runtime.create_session(teacher), {"input": inputs})["logits"]
        labels = np.argmax(logits, axis=-1).astype(np.int64)
    else:
        labels = generator.integers(0, CLASSES, samples).astype(np.int64)
    return inputs, labels


def dataset(inputs: np.ndarray, labels: np.ndarray | None, label_key: str = "label"):
    arrays = {"input": inputs}
    if labels is not None:
        arrays[label_key] = labels
    return dataset_from_arrays(arrays, label_key=label_key if labels is not None else None)


def two_layer_mlp(first: np.ndarray, second: np.ndarray) -> onnx.ModelProto:
    """x[N,4] → MatMul(W1) → Relu → MatMul(W2) → y[N,3]: one quantized activation between two weights."""
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["hidden"], name="matmul1"),
        helper.make_node("Relu", ["hidden"], ["activated"], name="relu"),
        helper.make_node("MatMul", ["activated", "w2"], ["logits"], name="matmul2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", first.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", second.shape[1]])],
        [numpy_helper.from_array(first.astype(np.float32), "w1"),
         numpy_helper.from_array(second.astype(np.float32), "w2")],
    )
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))

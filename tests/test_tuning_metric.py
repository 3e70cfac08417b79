"""A bound that the SQNR-driven defaults miss and the search meets: the class is decided by a few channels.

The stand-in classifier: ``stem`` (16 → 16), ``hidden`` (16 → 32) whose 28 "common" channels sit near +50 and whose
4 "class" channels are a hundred times smaller, then ``Relu`` and ``head`` (32 → 4) which adds the common channels
to every logit alike and the class channels through a random 4 × 4 matrix. The logits are large and nearly equal,
so their SQNR stays high whatever happens to the class channels; but one per-tensor range over ``hidden``'s output
(set by the common channels) rounds the class channels to zero, and the predicted class with them. The metric
(agreement with the FP32 model's predicted class) sees it, the output SQNR does not.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.tuning import TuningOptions, tune

COMMON, CLASS_CHANNELS, CLASSES, FEATURES = 28, 4, 4, 16


def few_channel_classifier(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    arrays = {
        "stem_weight": rng.normal(0, 0.3, (FEATURES, FEATURES)),
        "stem_bias": np.zeros(FEATURES),
        "hidden_weight": np.concatenate([rng.normal(0, 1.0, (FEATURES, COMMON)),
                                         rng.normal(0, 0.02, (FEATURES, CLASS_CHANNELS))], axis=1),
        "hidden_bias": np.concatenate([np.full(COMMON, 50.0), np.zeros(CLASS_CHANNELS)]),
        "head_weight": np.concatenate([np.ones((COMMON, CLASSES)), rng.normal(0, 1.0, (CLASS_CHANNELS, CLASSES))]),
        "head_bias": np.zeros(CLASSES),
    }
    nodes = [helper.make_node("Gemm", ["input", "stem_weight", "stem_bias"], ["stem_out"], name="stem"),
             helper.make_node("Gemm", ["stem_out", "hidden_weight", "hidden_bias"], ["hidden_out"], name="hidden"),
             helper.make_node("Relu", ["hidden_out"], ["relu_out"], name="relu"),
             helper.make_node("Gemm", ["relu_out", "head_weight", "head_bias"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "few_channel_classifier", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(array.astype(np.float32), name) for name, array in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _logits(path, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0]


def test_a_class_decided_by_a_few_channels_misses_with_the_sqnr_defaults_and_the_search_meets_it(tmp_path):
    inputs = np.random.default_rng(1).normal(0, 1, (384, FEATURES)).astype(np.float32)
    onnx.save(few_channel_classifier(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", input=inputs[:128])
    held_out = inputs[128:]
    reference = _logits(tmp_path / "m.onnx", held_out)
    labels = reference.argmax(axis=1)
    assert len(set(labels.tolist())) == CLASSES  # every class occurs: agreement is not a constant

    def agreement(path) -> float:
        return float(np.mean(_logits(path, held_out).argmax(axis=1) == labels))

    # the defaults: minmax ranges, the SQNR fallback at its default bound (the plain lowering, as the trials use)
    default = optimize(tmp_path / "m.onnx", tmp_path / "default.onnx",
                       OptimizeOptions(quantization=QuantizeOptions(speed_choice=False)),
                       calibration_data=tmp_path / "calib.npz")
    quantized = _logits(tmp_path / "default.onnx", held_out)
    sqnr = 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - quantized) ** 2))
    assert sqnr > 40 and default.quantization.sensitivity.fell_back == ()  # the SQNR sees nothing wrong
    assert sum(node.op_type == "QGemm" for node in onnx.load(tmp_path / "default.onnx").graph.node) == 3
    bound = 0.05
    assert agreement(tmp_path / "default.onnx") < 1.0 - bound - 0.5  # ... and the class is mostly lost

    result = tune(tmp_path / "m.onnx", tmp_path / "tuned.onnx", tmp_path / "calib.npz", agreement,
                  TuningOptions(max_drop=bound, latency_runs=0), OptimizeOptions(quantization=QuantizeOptions()))
    assert result.fp32_score == 1.0 and result.bound_met
    assert agreement(tmp_path / "tuned.onnx") >= 1.0 - bound
    chosen = result.trials[result.chosen].configuration
    assert set(chosen.fp32_layers) == {"head", "hidden"}  # the two layers around the class channels, not the stem
    assert any(node.op_type == "QGemm" for node in onnx.load(tmp_path / "tuned.onnx").graph.node)  # stem quantized
    assert not any(trial.meets_bound for trial in result.trials if not trial.configuration.fp32_layers)

"""Control-flow and recurrent test models, built with onnx.helper the way exporters write them.

The main one (:func:`speech_model`) is a small sequence model whose front end depends on a control input, as a
speech model's does on its sample rate: ``If(Greater(sample_rate, 8000))`` picks a MatMul projection (then) or a
1-D convolution (else), both producing ``[seq, batch, 16]``; an LSTM runs on the result and a MatMul head reads its
hidden states. Like torch.onnx's export of a ``batch_first`` LSTM, the model takes ``audio [batch, seq, 8]`` and
transposes it to the time-major ``x`` that the branches and the LSTM read, and transposes the logits back.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQUENCE, FEATURES, PROJECTED, HIDDEN, CLASSES = 6, 8, 16, 12, 5
OPSET = 17


def _init(name: str, array: np.ndarray, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array).astype(dtype), name)


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(graph: onnx.GraphProto, extra_opsets=()) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def projection_branch(generator, name: str = "then", width: int = PROJECTED) -> onnx.GraphProto:
    """x [seq, batch, 8] ─▶ MatMul(W) + b ─▶ Relu ─▶ [seq, batch, width] (weights: branch initializers)."""
    return helper.make_graph(
        [
            helper.make_node("MatMul", ["x", f"{name}.weight"], [f"{name}.matmul"], name=f"{name}.matmul"),
            helper.make_node("Add", [f"{name}.matmul", f"{name}.bias"], [f"{name}.sum"], name=f"{name}.add"),
            helper.make_node("Relu", [f"{name}.sum"], [f"{name}.out"], name=f"{name}.relu"),
        ],
        f"{name}_branch",
        [],
        [_float(f"{name}.out", [SEQUENCE, "batch", width])],
        [
            _init(f"{name}.weight", generator.standard_normal((FEATURES, width)) / np.sqrt(FEATURES)),
            _init(f"{name}.bias", generator.standard_normal(width) * 0.1),
        ],
    )


def convolution_branch(generator, name: str = "else") -> onnx.GraphProto:
    """x [seq, batch, 8] ─▶ Transpose [batch, 8, seq] ─▶ Conv1d(k=3) ─▶ Relu ─▶ Transpose [seq, batch, 16].

    The bias comes from a ``Constant`` node inside the branch, as torch.onnx writes constants.
    """
    bias = (generator.standard_normal(PROJECTED) * 0.1).astype(np.float32)
    return helper.make_graph(
        [
            helper.make_node("Constant", [], [f"{name}.bias"],
                             value=numpy_helper.from_array(bias, f"{name}.bias"), name=f"{name}.bias_constant"),
            helper.make_node("Transpose", ["x"], [f"{name}.channels"], perm=[1, 2, 0], name=f"{name}.to_channels"),
            helper.make_node("Conv", [f"{name}.channels", f"{name}.weight", f"{name}.bias"], [f"{name}.conv"],
                             pads=[1, 1], name=f"{name}.conv"),
            helper.make_node("Relu", [f"{name}.conv"], [f"{name}.relu"], name=f"{name}.relu"),
            helper.make_node("Transpose", [f"{name}.relu"], [f"{name}.out"], perm=[2, 0, 1], name=f"{name}.back"),
        ],
        f"{name}_branch",
        [],
        [_float(f"{name}.out", [SEQUENCE, "batch", PROJECTED])],
        [
            _init(f"{name}.weight", generator.standard_normal((PROJECTED, FEATURES, 3)) / np.sqrt(3 * FEATURES)),
        ],
    )


def lstm_weights(generator, input_size: int = PROJECTED, hidden: int = HIDDEN, directions: int = 1):
    scale = 1.0 / np.sqrt(hidden)
    return [
        _init("lstm.W", generator.uniform(-scale, scale, (directions, 4 * hidden, input_size))),
        _init("lstm.R", generator.uniform(-scale, scale, (directions, 4 * hidden, hidden))),
        _init("lstm.B", generator.uniform(-scale, scale, (directions, 8 * hidden))),
    ]


def speech_model(seed: int = 0, control: str = "sample_rate", recurrent: str = "LSTM") -> onnx.ModelProto:
    """If on a control input (``sample_rate`` int64 scalar: > 8000 takes the MatMul branch; ``mode`` bool scalar:
    true takes it) ─▶ LSTM (or GRU) ─▶ MatMul head ─▶ ``logits [seq, batch, 5]``."""
    generator = np.random.default_rng(seed)
    initializers = [_init("head.weight", generator.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN))]
    nodes = []
    if control == "sample_rate":
        initializers.append(_init("threshold", np.array(8000), np.int64))
        nodes.append(helper.make_node("Greater", ["sample_rate", "threshold"], ["wide"], name="is_wide"))
        control_input = helper.make_tensor_value_info("sample_rate", TensorProto.INT64, [])
        condition = "wide"
    else:
        control_input = helper.make_tensor_value_info("mode", TensorProto.BOOL, [])
        condition = "mode"
    nodes.append(helper.make_node("Transpose", ["audio"], ["x"], perm=[1, 0, 2], name="time_major"))
    nodes.append(helper.make_node("If", [condition], ["features"], name="front_end",
                                  then_branch=projection_branch(generator), else_branch=convolution_branch(generator)))
    if recurrent == "LSTM":
        initializers += lstm_weights(generator)
        nodes.append(helper.make_node("LSTM", ["features", "lstm.W", "lstm.R", "lstm.B"], ["states", "last"],
                                      hidden_size=HIDDEN, name="lstm"))
    else:
        scale = 1.0 / np.sqrt(HIDDEN)
        initializers += [
            _init("gru.W", generator.uniform(-scale, scale, (1, 3 * HIDDEN, PROJECTED))),
            _init("gru.R", generator.uniform(-scale, scale, (1, 3 * HIDDEN, HIDDEN))),
        ]
        nodes.append(helper.make_node("GRU", ["features", "gru.W", "gru.R"], ["states", "last"], hidden_size=HIDDEN,
                                      name="gru"))
    initializers.append(_init("squeeze_axes", np.array([1]), np.int64))
    nodes += [
        helper.make_node("Squeeze", ["states", "squeeze_axes"], ["hidden"], name="squeeze"),
        helper.make_node("MatMul", ["hidden", "head.weight"], ["time_logits"], name="head"),
        helper.make_node("Transpose", ["time_logits"], ["logits"], perm=[1, 0, 2], name="batch_major"),
    ]
    graph = helper.make_graph(
        nodes,
        "speech",
        [_float("audio", ["batch", SEQUENCE, FEATURES]), control_input],
        [_float("logits", ["batch", SEQUENCE, CLASSES])],
        initializers,
    )
    return onnx.shape_inference.infer_shapes(_model(graph))


def differing_shapes_model(seed: int = 0) -> onnx.ModelProto:
    """An If on ``mode`` whose branches return different widths (16 vs 8): ReduceMean over the last axis and a
    MatMul before the If make the output shape-independent."""
    generator = np.random.default_rng(seed)
    narrow = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["narrow.out"], name="narrow.sigmoid")],
        "narrow_branch", [], [_float("narrow.out", [SEQUENCE, "batch", FEATURES])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["audio"], ["x"], perm=[1, 0, 2], name="time_major"),
            helper.make_node("If", ["mode"], ["features"], name="front_end",
                             then_branch=projection_branch(generator), else_branch=narrow),
            helper.make_node("ReduceMean", ["features"], ["pooled"], axes=[2], keepdims=1, name="pool"),
        ],
        "differing",
        [_float("audio", ["batch", SEQUENCE, FEATURES]), helper.make_tensor_value_info("mode", TensorProto.BOOL, [])],
        [_float("pooled", [SEQUENCE, "batch", 1])],
    )
    return _model(graph)


def speech_batches(count: int = 4, batch: int = 8, seed: int = 1, **controls):
    """Calibration batches of ``audio [batch, seq, 8]``; each keyword (``mode=[True, False]``) adds that control
    input, cycling over the values given."""
    generator = np.random.default_rng(seed)
    batches = []
    for index in range(count):
        batch_data = {"audio": generator.standard_normal((batch, SEQUENCE, FEATURES)).astype(np.float32)}
        for name, values in controls.items():
            batch_data[name] = np.asarray(values[index % len(values)])
        batches.append(batch_data)
    return batches

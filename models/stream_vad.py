"""A streaming voice-activity model with a recurrent state input, written the way torch.onnx exports one.

It stands in for models such as Silero VAD: each call takes one chunk of audio, the recurrent state the previous
call returned and the sample rate, and returns a speech probability and the next state::

    input  float32 [batch, samples]        512 samples at 16 kHz, 256 at 8 kHz (32 ms)
    state  float32 [2, batch, hidden]      LSTM: state[0] = h, state[1] = c  (GRU variant: ``h0``, two layers)
    sr     int64   []                      the sample rate, a scalar

    If(Equal(sr, 16000)):  Conv1d(1→C, kernel 64, stride 32)       else: Conv1d(1→C, kernel 32, stride 16)
        on Unsqueeze(input, 1) = [batch, 1, samples]  ─▶  [batch, C, 15] either way
    ─▶ Relu ─▶ Conv1d(C→F, kernel 1) ─▶ Relu ─▶ ReduceMean over time ─▶ [batch, F] ─▶ Unsqueeze ─▶ [1, batch, F]
    ─▶ LSTM(initial_h = state[0:1], initial_c = state[1:2])            (Split of ``state`` along axis 0)
    ─▶ stateN = Concat(Y_h, Y_c)                       [2, batch, hidden]
    ─▶ output = Sigmoid(MatMul(Relu(Squeeze(Y_h)), W) + b)    [batch, 1]

The GRU variant stacks two GRU layers, as torch.onnx writes ``nn.GRU(num_layers=2)``: ``h0 [2, batch, hidden]`` is
split into one initial state per layer, the first layer's ``Y`` (squeezed to ``[1, batch, hidden]``) feeds the
second, and ``stateN = Concat(hn_0, hn_1)``.

The recurrent state is ``[layers, batch, hidden]``, ONNX's layout for ``initial_h``/``initial_c``: its batch is on
axis 1, which is what ``--batch-axis state=1`` (or ``--infer-state-axes``) tells qgraph's data readers. Fixing the
sample rate (``--fix-input sr=16000``) folds the ``Equal`` and inlines the 16 kHz branch.

Weights are seeded random (no download): He-normal convolutions ``N(0, 2 / fan_in)``, PyTorch's recurrent
initialisation ``U(-1/sqrt(hidden), 1/sqrt(hidden))`` and a Glorot-uniform decoder, with the first recurrent layer's
input weights and the decoder multiplied by ``gain`` (8): at PyTorch's scale the untrained model's output sits at
0.5 ± 0.002 whatever it hears, which would make any error measure meaningless; with the gain the LSTM variant's
speech probability spans about 0.4-0.9 and follows the chunk's log-energy (correlation 0.93 on 8 s of
:func:`synthetic_speech`). :func:`synthetic_speech` writes a
reproducible signal of voiced bursts (harmonics of a gliding pitch under a syllable envelope) over low noise, and
:func:`stream_feeds` runs the FP32 model over it chunk by chunk, carrying the state as a deployment does: each feed
is exactly what the model takes at batch 1, the per-sample form of calibration data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

OPSET_VERSION = 17
IR_VERSION = 8
#: Samples per chunk at each supported sample rate (32 ms).
CHUNK_SAMPLES = {16000: 512, 8000: 256}
#: The front end's (kernel, stride) per sample rate: 15 frames of one chunk either way.
FRONT_END = {16000: (64, 32), 8000: (32, 16)}
RECURRENT_KINDS = ("LSTM", "GRU")
INPUT_NAME, SAMPLE_RATE_NAME, OUTPUT_NAME, STATE_OUTPUT_NAME = "input", "sr", "output", "stateN"
#: The state input's name per recurrent kind (torch.onnx keeps the names given at export).
STATE_NAMES = {"LSTM": "state", "GRU": "h0"}


def _tensor(name: str, array, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(array, dtype=dtype), name)


def _he_normal(generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in = math.prod(shape[1:])
    return generator.standard_normal(shape) * math.sqrt(2.0 / fan_in)


def _front_end_branch(generator: np.random.Generator, sample_rate: int, channels: int) -> onnx.GraphProto:
    """Unsqueeze(input, 1) ─▶ Conv1d(1→channels) with this rate's kernel and stride, weights as branch initializers."""
    kernel, stride = FRONT_END[sample_rate]
    name = f"front_end_{sample_rate // 1000}k"
    nodes = [
        helper.make_node("Unsqueeze", [INPUT_NAME, f"{name}.axes"], [f"{name}.audio"], name=f"{name}.unsqueeze"),
        helper.make_node("Conv", [f"{name}.audio", f"{name}.weight", f"{name}.bias"], [f"{name}.out"],
                         kernel_shape=[kernel], strides=[stride], pads=[0, 0], name=f"{name}.conv"),
    ]
    initializers = [
        _tensor(f"{name}.axes", [1], np.int64),
        _tensor(f"{name}.weight", _he_normal(generator, (channels, 1, kernel))),
        _tensor(f"{name}.bias", generator.standard_normal(channels) * 0.01),
    ]
    output = helper.make_tensor_value_info(f"{name}.out", TensorProto.FLOAT, ["batch", channels, "frames"])
    return helper.make_graph(nodes, f"{name}_branch", [], [output], initializers)


def _recurrent_weights(generator, kind: str, layer: int, input_size: int, hidden: int,
                       input_gain: float = 1.0) -> list[onnx.TensorProto]:
    gates = 4 if kind == "LSTM" else 3
    bound = 1.0 / math.sqrt(hidden)
    prefix = f"{kind.lower()}.{layer}"
    return [
        _tensor(f"{prefix}.W", input_gain * generator.uniform(-bound, bound, (1, gates * hidden, input_size))),
        _tensor(f"{prefix}.R", generator.uniform(-bound, bound, (1, gates * hidden, hidden))),
        _tensor(f"{prefix}.B", generator.uniform(-bound, bound, (1, 2 * gates * hidden))),
    ]


def build_stream_vad(recurrent: str = "LSTM", *, channels: int = 32, features: int = 64, hidden: int = 64,
                     gain: float = 8.0, seed: int = 0) -> onnx.ModelProto:
    """The stand-in streaming VAD (see the module docstring): inputs ``input``, ``state`` (LSTM) or ``h0`` (GRU) and
    ``sr``; outputs ``output`` and ``stateN``."""
    if recurrent not in RECURRENT_KINDS:
        raise ValueError(f"recurrent must be one of {', '.join(RECURRENT_KINDS)}, got {recurrent!r}")
    generator = np.random.default_rng(seed)
    state_name = STATE_NAMES[recurrent]
    nodes = [
        helper.make_node("Constant", [], ["wide_band_rate"], value=_tensor("wide_band_rate", 16000, np.int64),
                         name="wide_band_rate_constant"),
        helper.make_node("Equal", [SAMPLE_RATE_NAME, "wide_band_rate"], ["is_wide_band"], name="is_wide_band"),
        helper.make_node("If", ["is_wide_band"], ["frames"], name="front_end",
                         then_branch=_front_end_branch(generator, 16000, channels),
                         else_branch=_front_end_branch(generator, 8000, channels)),
        helper.make_node("Relu", ["frames"], ["frames_relu"], name="front_end_relu"),
        helper.make_node("Conv", ["frames_relu", "encoder.weight", "encoder.bias"], ["encoded"], kernel_shape=[1],
                         name="encoder"),
        helper.make_node("Relu", ["encoded"], ["encoded_relu"], name="encoder_relu"),
        helper.make_node("ReduceMean", ["encoded_relu"], ["pooled"], axes=[2], keepdims=0, name="pool"),
        helper.make_node("Unsqueeze", ["pooled", "axis_0"], ["sequence"], name="to_sequence"),
        helper.make_node("Split", [state_name, "state_split"], ["state_0", "state_1"], axis=0, name="split_state"),
    ]
    initializers = [
        _tensor("encoder.weight", _he_normal(generator, (features, channels, 1))),
        _tensor("encoder.bias", generator.standard_normal(features) * 0.01),
        _tensor("axis_0", [0], np.int64),
        _tensor("state_split", [1, 1], np.int64),
    ]
    if recurrent == "LSTM":
        initializers += _recurrent_weights(generator, "LSTM", 0, features, hidden, gain)
        nodes += [
            helper.make_node("LSTM", ["sequence", "lstm.0.W", "lstm.0.R", "lstm.0.B", "", "state_0", "state_1"],
                             ["lstm_y", "lstm_h", "lstm_c"], hidden_size=hidden, name="lstm"),
            helper.make_node("Concat", ["lstm_h", "lstm_c"], [STATE_OUTPUT_NAME], axis=0, name="next_state"),
        ]
        last_hidden = "lstm_h"
    else:
        initializers += _recurrent_weights(generator, "GRU", 0, features, hidden, gain)
        initializers += _recurrent_weights(generator, "GRU", 1, hidden, hidden)
        initializers.append(_tensor("axis_1", [1], np.int64))
        nodes += [
            helper.make_node("GRU", ["sequence", "gru.0.W", "gru.0.R", "gru.0.B", "", "state_0"],
                             ["gru_0_y", "gru_0_h"], hidden_size=hidden, linear_before_reset=1, name="gru_0"),
            helper.make_node("Squeeze", ["gru_0_y", "axis_1"], ["gru_0_sequence"], name="gru_0_squeeze"),
            helper.make_node("GRU", ["gru_0_sequence", "gru.1.W", "gru.1.R", "gru.1.B", "", "state_1"],
                             ["gru_1_y", "gru_1_h"], hidden_size=hidden, linear_before_reset=1, name="gru_1"),
            helper.make_node("Concat", ["gru_0_h", "gru_1_h"], [STATE_OUTPUT_NAME], axis=0, name="next_state"),
        ]
        last_hidden = "gru_1_h"
    limit = math.sqrt(6.0 / (hidden + 1))
    initializers += [
        _tensor("decoder.weight", gain * generator.uniform(-limit, limit, (hidden, 1))),
        _tensor("decoder.bias", [0.0]),
    ]
    nodes += [
        helper.make_node("Squeeze", [last_hidden, "axis_0"], ["last_hidden"], name="last_hidden"),
        helper.make_node("Relu", ["last_hidden"], ["decoder_input"], name="decoder_relu"),
        helper.make_node("MatMul", ["decoder_input", "decoder.weight"], ["decoder_matmul"], name="decoder_matmul"),
        helper.make_node("Add", ["decoder_matmul", "decoder.bias"], ["logit"], name="decoder_add"),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME], name="probability"),
    ]
    graph = helper.make_graph(
        nodes,
        f"stream_vad_{recurrent.lower()}",
        [
            helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info(state_name, TensorProto.FLOAT, [2, "batch", hidden]),
            helper.make_tensor_value_info(SAMPLE_RATE_NAME, TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info(STATE_OUTPUT_NAME, TensorProto.FLOAT, [2, "batch", hidden]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET_VERSION)],
                              producer_name="qgraph.models", ir_version=IR_VERSION)
    model = onnx.shape_inference.infer_shapes(model)  # torch.onnx stores the inferred value_info too
    logger.debug("built stream VAD (%s, hidden %d): %d nodes", recurrent, hidden, len(nodes))
    return model


def synthetic_speech(seconds: float, sample_rate: int = 16000, *, seed: int = 0) -> np.ndarray:
    """A reproducible float32 signal: voiced bursts (five harmonics of a gliding 100-250 Hz pitch under a raised
    cosine envelope, 150-400 ms each) separated by 100-500 ms pauses, over Gaussian noise of amplitude 0.01."""
    if sample_rate not in CHUNK_SAMPLES:
        raise ValueError(f"sample_rate must be one of {', '.join(map(str, CHUNK_SAMPLES))}, got {sample_rate}")
    generator = np.random.default_rng(seed)
    total = int(seconds * sample_rate)
    signal = generator.standard_normal(total) * 0.01
    position = int(generator.uniform(0.05, 0.3) * sample_rate)
    while position < total:
        length = min(int(generator.uniform(0.15, 0.4) * sample_rate), total - position)
        time = np.arange(length) / sample_rate
        pitch = generator.uniform(100, 250) * (1 + generator.uniform(-0.2, 0.2) * time / max(time[-1], 1e-9))
        phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
        voiced = sum(np.sin(harmonic * phase) / harmonic for harmonic in range(1, 6))
        envelope = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / max(length - 1, 1))
        signal[position:position + length] += generator.uniform(0.1, 0.5) * envelope * voiced
        position += length + int(generator.uniform(0.1, 0.5) * sample_rate)
    return signal.astype(np.float32)


def stream_feeds(model: onnx.ModelProto, audio: np.ndarray, sample_rate: int = 16000) -> Iterator[dict]:
    """The feeds a streaming deployment gives ``model`` for ``audio``, chunk by chunk at batch 1: ``input [1, S]``,
    the state the previous chunk returned (zeros first) and ``sr``; the last partial chunk is dropped."""
    from qgraph.runtime import create_session

    session = create_session(model)
    state_input = next(value for value in model.graph.input if value.name in STATE_NAMES.values())
    hidden = state_input.type.tensor_type.shape.dim[2].dim_value
    chunk = CHUNK_SAMPLES[sample_rate]
    state = np.zeros((2, 1, hidden), np.float32)
    for start in range(0, len(audio) - chunk + 1, chunk):
        feeds = {INPUT_NAME: audio[None, start:start + chunk].astype(np.float32), state_input.name: state,
                 SAMPLE_RATE_NAME: np.array(sample_rate, np.int64)}
        yield feeds
        state = session.run([STATE_OUTPUT_NAME], feeds)[0]


def write_feed_folder(folder: str | Path, feeds) -> int:
    """Write each feed as ``feed_00000.npz, feed_00001.npz, …`` in ``folder`` (created); returns how many."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, feed in enumerate(feeds, start=1):
        np.savez(folder / f"feed_{count - 1:05d}.npz", **feed)
    return count

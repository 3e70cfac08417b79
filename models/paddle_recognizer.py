"""A stand-in for an OCR text recogniser exported by paddle2onnx (PP-OCRv3 style, opset 13), built node by node.

The graph is what paddle2onnx writes for PaddleOCR's ``MobileNetV1Enhance`` backbone, ``EncoderWithSVTR`` neck and
``CTCHead`` at opset 13, so that the quantizer and its sensitivity search meet a real recogniser's size and shapes
(over 800 nodes, 100+ quantizable layers) without shipping a pretrained file:

- input ``x``: batch×3×32×320 (a text line, normalised to [-1, 1]); output ``logits``: batch×40×97 (per timestep,
  the 96 characters of the English dictionary and the CTC blank);
- **hard_swish** at opset < 14 as paddle2onnx's mapper writes it, with a fresh ``Constant`` per operand::

      y = x · Clip(x + 3, 0, 6) / 6          Add, Clip(min, max inputs), Mul, Div

- **backbone**: a 3×3/2 stem and 13 depthwise-separable blocks (depthwise k×k Conv + BatchNormalization + hard_swish,
  pointwise 1×1 Conv + BN + hard_swish), strides (2, 1) that halve the height only, two squeeze-excitation blocks
  (GlobalAveragePool → 1×1 Conv → Relu → 1×1 Conv → HardSigmoid(0.2, 0.5) → Mul), then AveragePool 2×2/2: 1×40;
- **neck** (SVTR): Conv 3×3 + BN + swish, Conv 1×1 + BN + swish (``x · Sigmoid(x)``), flatten to 40 tokens (the
  Shape → Slice → Concat → Reshape paddle2onnx writes for ``flatten(2)``), two pre-norm transformer blocks
  (8 heads, MLP ratio 2, swish), a final LayerNorm, back to an image, Conv 1×1, Concat with the shortcut, Conv 3×3,
  Conv 1×1 (each + BN + swish);
- **LayerNorm** as paddle2onnx writes it below opset 17::

      μ = ReduceMean(x)   d = x − μ   σ² = ReduceMean(Pow(d, 2))   n = d / Sqrt(σ² + ε)
      y = n · Reshape(γ, Slice(Shape(x))) + Reshape(β, Slice(Shape(x)))

- **attention**: ``qkv = x·W + b`` reshaped to (0, −1, 3, heads, d), transposed (2, 0, 3, 1, 4), q/k/v taken with
  Slice + Squeeze, ``Softmax(q·s · kᵀ) · v``, transposed back and reshaped to (0, −1, C), projected;
- **head**: Squeeze the unit height, Transpose to time-major, MatMul + Add to the classes.

Weights are seeded random: He-normal convolutions, BatchNorm γ ∈ [0.3, 0.5] and β ~ N(1, 0.2²) with running
statistics fitted to generated text lines (so activations keep a realistic, O(1), input-dependent scale through
the depth, as a trained network's do), Glorot-uniform dense layers. Like trained networks, a
few layers have outliers: one pointwise convolution has two output channels with BN gain ×``outlier_gain``, and the
second transformer block's MLP output writes two channels ×``outlier_gain`` into the residual stream, so per-tensor
activation ranges there are dominated by a few channels: fully quantized (int8, minmax) the output SQNR is just
under the default 10 dB bound (about 9 dB), without the outliers about 11.6 dB. :func:`calibration_images` generates
text-line-like images (a light background, dark glyph strokes, noise) as the calibration set.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET_VERSION = 13
IR_VERSION = 8
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (3, 32, 320)
NUM_CLASSES = 97
#: Timesteps of the output (the width after the backbone) and the backbone's last width.
TIMESTEPS = 40
CHANNELS = 256
#: Gain of the outlier channels (see the module docstring).
DEFAULT_OUTLIER_GAIN = 40.0

#: Repeats of the 5×5 depthwise block at 128 channels (the backbone's long middle stage).
MIDDLE_BLOCKS = 19
#: The backbone's depthwise-separable blocks: (input channels, output channels, stride, kernel, squeeze-excite).
_BLOCKS = (
    (16, 32, (1, 1), 3, False), (32, 64, (2, 2), 3, False), (64, 64, (1, 1), 3, False),
    (64, 128, (2, 1), 3, False), (128, 128, (1, 1), 3, False),
    *[(128, 128, (1, 1), 5, False)] * MIDDLE_BLOCKS,
    (128, 256, (2, 1), 3, True), (256, 256, (1, 1), 5, True),
)
#: The block whose pointwise convolution has outlier channels.
_OUTLIER_BLOCK = 12
#: BatchNorm γ range and β mean. With γ ~ 1 and β ~ 0 a deep random stack is chaotic (measured: input noise at
#: 60 dB SNR comes out of the backbone at 12 dB); γ ∈ [0.3, 0.5] with β ≈ 1 keeps the hard_swish inputs in its
#: smooth range and the network contracting, as trained ones are (60 dB in, 67 dB out).
_BN_GAIN = (0.3, 0.5)
_BN_SHIFT = 1.0


class _Paddle2OnnxWriter:
    """Nodes named as paddle2onnx names them (``p2o.Op.N``), one ``Constant`` node per constant operand."""

    def __init__(self, seed: int) -> None:
        self.generator = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.counts: dict[str, int] = {}

    def fresh(self, stem: str) -> str:
        count = self.counts.get(stem, 0)
        self.counts[stem] = count + 1
        return f"{stem}.{count}"

    def node(self, op_type: str, inputs: list[str], **attributes) -> str:
        name = self.fresh(f"p2o.{op_type}")
        output = f"{name}.out"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attributes))
        return output

    def constant(self, value, dtype=np.float32) -> str:
        array = np.array(value, dtype=dtype)
        return self.node("Constant", [], value=numpy_helper.from_array(array))

    def parameter(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    # -- layers -----------------------------------------------------------------------------------------------
    def conv_bn(self, x: str, in_channels: int, out_channels: int, kernel: int, *, stride=(1, 1), group: int = 1,
                gain: np.ndarray | None = None) -> str:
        fan_in = in_channels // group * kernel * kernel
        weight = self.generator.standard_normal((out_channels, in_channels // group, kernel, kernel))
        weight *= math.sqrt(2.0 / fan_in)
        y = self.node("Conv", [x, self.parameter("conv2d.w", weight)], kernel_shape=[kernel, kernel],
                      strides=list(stride), pads=[kernel // 2] * 4, group=group, dilations=[1, 1])
        scale = self.generator.uniform(*_BN_GAIN, out_channels)
        if gain is not None:
            scale = scale * gain
        bias = self.generator.normal(_BN_SHIFT, 0.2, out_channels)
        mean = self.generator.normal(0.0, 0.1, out_channels)
        variance = self.generator.uniform(0.8, 1.2, out_channels)
        return self.node("BatchNormalization", [y, self.parameter("batch_norm.w", scale),
                                                self.parameter("batch_norm.b", bias),
                                                self.parameter("batch_norm.mean", mean),
                                                self.parameter("batch_norm.var", variance)], epsilon=1e-5)

    def hard_swish(self, x: str) -> str:
        shifted = self.node("Add", [x, self.constant([3.0])])
        clipped = self.node("Clip", [shifted, self.constant(0.0), self.constant(6.0)])
        product = self.node("Mul", [x, clipped])
        return self.node("Div", [product, self.constant([6.0])])

    def swish(self, x: str) -> str:
        return self.node("Mul", [x, self.node("Sigmoid", [x])])

    def linear(self, x: str, in_features: int, out_features: int, *, gain: np.ndarray | None = None) -> str:
        limit = math.sqrt(6.0 / (in_features + out_features))
        weight = self.generator.uniform(-limit, limit, (in_features, out_features))
        if gain is not None:
            weight = weight * gain
        bias = self.generator.normal(0.0, 0.02, out_features)
        y = self.node("MatMul", [x, self.parameter("linear.w", weight)])
        return self.node("Add", [y, self.parameter("linear.b", bias)])

    def slice(self, x: str, axis: int, start: int, end: int) -> str:
        return self.node("Slice", [x, self.constant([start], np.int64), self.constant([end], np.int64),
                                   self.constant([axis], np.int64)])

    def layer_norm(self, x: str, features: int, rank: int = 3, epsilon: float = 1e-5) -> str:
        epsilon_value, two = self.constant([epsilon]), self.constant([2.0])
        mean = self.node("ReduceMean", [x], axes=[-1], keepdims=1)
        centred = self.node("Sub", [x, mean])
        variance = self.node("ReduceMean", [self.node("Pow", [centred, two])], axes=[-1], keepdims=1)
        deviation = self.node("Sqrt", [self.node("Add", [variance, epsilon_value])])
        weight_shape = self.slice(self.node("Shape", [x]), 0, rank - 1, rank)
        scale = self.node("Reshape", [self.parameter("layer_norm.w", self.generator.uniform(0.8, 1.2, features)),
                                      weight_shape])
        bias = self.node("Reshape", [self.parameter("layer_norm.b", self.generator.normal(0, 0.05, features)),
                                     weight_shape])
        normalised = self.node("Div", [centred, deviation])
        return self.node("Add", [self.node("Mul", [normalised, scale]), bias])

    def attention(self, x: str, dim: int, heads: int) -> str:
        head_dim = dim // heads
        qkv = self.linear(x, dim, 3 * dim)
        shape = self.node("Concat", [self.constant([0, -1, 3, heads], np.int64),
                                     self.dynamic_shape(x, [], heads)], axis=0)
        qkv = self.node("Reshape", [qkv, shape])
        qkv = self.node("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
        query, key, value = (self.node("Squeeze", [self.slice(qkv, 0, index, index + 1),
                                                   self.constant([0], np.int64)]) for index in range(3))
        query = self.node("Mul", [query, self.constant(head_dim ** -0.5)])
        scores = self.node("MatMul", [query, self.node("Transpose", [key], perm=[0, 1, 3, 2])])
        weights = self.node("Identity", [self.node("Softmax", [scores], axis=-1)])  # attn_drop at inference
        context = self.node("Transpose", [self.node("MatMul", [weights, value])], perm=[0, 2, 1, 3])
        context = self.node("Reshape", [context, self.dynamic_shape(x, [0, -1], 1)])
        return self.node("Identity", [self.linear(context, dim, dim)])  # proj_drop

    def dynamic_shape(self, x: str, leading: list[int], divisor: int, trailing: list[int] = ()) -> str:
        """``leading + [C // divisor] + trailing`` with C read from ``Shape(x)`` (``N, C = x.shape[1:]``)."""
        channels = self.node("Div", [self.slice(self.node("Shape", [x]), 0, 2, 3),
                                     self.constant([divisor], np.int64)])
        parts = [self.constant(leading, np.int64), channels]
        if trailing:
            parts.append(self.constant(list(trailing), np.int64))
        return self.node("Concat", parts, axis=0)

    def transformer_block(self, x: str, dim: int, heads: int, *, outlier_gain: float | None) -> str:
        x = self.node("Add", [x, self.attention(self.layer_norm(x, dim), dim, heads)])
        x = self.node("Identity", [x])  # drop_path at inference
        hidden = self.node("Identity", [self.swish(self.linear(self.layer_norm(x, dim), dim, 2 * dim))])
        gain = None
        if outlier_gain is not None:
            gain = np.ones(dim)
            gain[[3, 77]] = outlier_gain
        return self.node("Add", [x, self.node("Identity", [self.linear(hidden, 2 * dim, dim, gain=gain)])])


def build_paddle_recognizer(*, num_classes: int = NUM_CLASSES, outlier_gain: float = DEFAULT_OUTLIER_GAIN,
                            seed: int = 0) -> onnx.ModelProto:
    """The recogniser above as an opset-13 model (input ``x``: batch×3×32×320, output ``logits``: batch×40×classes).

    Fitting the BatchNorm statistics takes a few seconds, so each configuration is built once per process; every
    call returns a fresh copy.
    """
    return onnx.load_from_string(_built(num_classes, float(outlier_gain), seed))


@functools.cache
def _built(num_classes: int, outlier_gain: float, seed: int) -> bytes:
    writer = _Paddle2OnnxWriter(seed)
    x = writer.hard_swish(writer.conv_bn(INPUT_NAME, 3, 16, 3, stride=(2, 2)))
    for index, (in_channels, out_channels, stride, kernel, squeeze) in enumerate(_BLOCKS):
        x = writer.hard_swish(writer.conv_bn(x, in_channels, in_channels, kernel, stride=stride, group=in_channels))
        if squeeze:
            pooled = writer.node("GlobalAveragePool", [x])
            weight = (writer.generator.standard_normal((in_channels // 4, in_channels, 1, 1))
                      * math.sqrt(2 / in_channels))
            reduced = writer.node("Relu", [writer.node("Conv", [pooled, writer.parameter("conv2d.w", weight),
                                                                writer.parameter("conv2d.b",
                                                                                 np.zeros(in_channels // 4))],
                                                       kernel_shape=[1, 1])])
            weight = (writer.generator.standard_normal((in_channels, in_channels // 4, 1, 1))
                      * math.sqrt(8 / in_channels))
            expanded = writer.node("Conv", [reduced, writer.parameter("conv2d.w", weight),
                                            writer.parameter("conv2d.b", np.zeros(in_channels))], kernel_shape=[1, 1])
            x = writer.node("Mul", [x, writer.node("HardSigmoid", [expanded], alpha=0.2, beta=0.5)])
        gain = None
        if index == _OUTLIER_BLOCK:
            gain = np.ones(out_channels)
            gain[[5, 100]] = outlier_gain
        x = writer.hard_swish(writer.conv_bn(x, in_channels, out_channels, 1, gain=gain))
    x = writer.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])  # batch×256×1×40
    shortcut = x
    dim, hidden_channels = 64, 120
    z = writer.swish(writer.conv_bn(x, CHANNELS, dim, 3))
    z = writer.swish(writer.conv_bn(z, dim, hidden_channels, 1))
    # flatten(2): the first two dimensions of the shape, then -1
    leading = writer.slice(writer.node("Shape", [z]), 0, 0, 2)
    z = writer.node("Reshape", [z, writer.node("Concat", [leading, writer.constant([-1], np.int64)], axis=0)])
    z = writer.node("Transpose", [z], perm=[0, 2, 1])  # batch×40×120
    for block in range(2):
        z = writer.transformer_block(z, hidden_channels, 8, outlier_gain=outlier_gain if block == 1 else None)
    z = writer.layer_norm(z, hidden_channels)
    z = writer.node("Reshape", [z, writer.constant([0, 1, TIMESTEPS, hidden_channels], np.int64)])
    z = writer.node("Transpose", [z], perm=[0, 3, 1, 2])
    z = writer.swish(writer.conv_bn(z, hidden_channels, CHANNELS, 1))
    z = writer.node("Concat", [shortcut, z], axis=1)
    z = writer.swish(writer.conv_bn(z, 2 * CHANNELS, dim, 3))
    z = writer.swish(writer.conv_bn(z, dim, dim, 1))
    z = writer.node("Squeeze", [z, writer.constant([2], np.int64)])
    z = writer.node("Transpose", [z], perm=[0, 2, 1])  # batch×40×64
    logits = writer.linear(z, dim, num_classes)
    last = writer.nodes[-1]
    last.output[0] = OUTPUT_NAME
    graph = helper.make_graph(
        writer.nodes, "paddle_recognizer",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["p2o.DynamicDimension.0", *INPUT_SHAPE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                       ["p2o.DynamicDimension.0", TIMESTEPS, num_classes])],
        writer.initializers,
    )
    del logits
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET_VERSION)],
                              producer_name="PaddlePaddle", ir_version=IR_VERSION)
    _fit_batch_norm_statistics(model, calibration_images(2, seed=seed + 1000))
    return model.SerializeToString()


def _fit_batch_norm_statistics(model: onnx.ModelProto, images: np.ndarray) -> None:
    """Set every BatchNormalization's running mean and variance to the statistics of its input on ``images``.

    A trained network's BatchNorm statistics are those of its data; with random ones the input-dependent part of
    the activations fades block after block (measured: the spread across samples falls ~30% per block, so a deep
    random backbone's output hardly depends on its input). The layers are fitted in graph order, each on the
    activations that the already fitted ones produce: one session whose statistics are inputs, run once per layer
    on the prefix that layer needs.
    """
    from qgraph import runtime

    batch_norms = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    statistics = {name for node in batch_norms for name in node.input[3:5]}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    kept = [tensor for tensor in probe.graph.initializer if tensor.name not in statistics]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    probe.graph.input.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, [initializers[name].dims[0]])
                             for name in sorted(statistics))
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None)
                              for node in batch_norms)
    session = runtime.create_session(probe, optimize=True)
    feeds = {name: numpy_helper.to_array(initializers[name]) for name in statistics}
    feeds[INPUT_NAME] = images
    for node in batch_norms:
        (activation,) = session.run([node.input[0]], feeds)
        axes = (0, *range(2, activation.ndim))
        feeds[node.input[3]] = activation.mean(axis=axes).astype(np.float32)
        feeds[node.input[4]] = np.maximum(activation.var(axis=axes), 1e-6).astype(np.float32)
    for name in statistics:
        initializers[name].CopyFrom(numpy_helper.from_array(feeds[name], name))


def calibration_images(count: int = 256, *, seed: int = 0) -> np.ndarray:
    """``count`` text-line-like images, count×3×32×320 float32 in [-1, 1] (PaddleOCR's ``(x/255 − 0.5)/0.5``).

    Each is a light, slightly tinted background with a row of dark glyphs (random vertical, horizontal and
    diagonal strokes in 16-pixel cells) and pixel noise.
    """
    generator = np.random.default_rng(seed)
    channels, height, width = INPUT_SHAPE
    rows = np.arange(height)[:, None]
    columns = np.arange(width)[None, :]
    images = np.empty((count, channels, height, width), np.float32)
    for index in range(count):
        ink = np.zeros((height, width))
        top, bottom = generator.integers(4, 9), generator.integers(23, 29)
        glyphs = generator.integers(8, width // 16)
        for glyph in range(glyphs):
            left = 16 * glyph + generator.integers(0, 4)
            for _ in range(generator.integers(1, 4)):
                kind = generator.integers(0, 3)
                thickness = generator.integers(1, 3)
                if kind == 0:  # vertical stroke
                    at = left + generator.integers(0, 12)
                    ink[top:bottom, at:at + thickness] = 1.0
                elif kind == 1:  # horizontal stroke
                    at = generator.integers(top, bottom)
                    ink[at:at + thickness, left:left + 12] = 1.0
                else:  # diagonal stroke
                    slope = generator.uniform(-0.5, 0.5)
                    line = np.abs(columns - left - 6 - slope * (rows - (top + bottom) / 2)) < thickness
                    ink[top:bottom] = np.maximum(ink[top:bottom], line[top:bottom] * (columns < left + 14))
        background = generator.uniform(0.75, 1.0, (channels, 1, 1))
        darkness = generator.uniform(0.6, 0.95)
        pixels = background * (1.0 - darkness * ink[None]) + generator.normal(0.0, 0.03, (channels, height, width))
        images[index] = (np.clip(pixels, 0.0, 1.0) - 0.5) / 0.5
    return images


def save_calibration_set(path, count: int = 256, *, seed: int = 0) -> None:
    """The calibration set as an ``.npz`` whose key is the model's input name."""
    np.savez(path, **{INPUT_NAME: calibration_images(count, seed=seed)})

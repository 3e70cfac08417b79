"""MobileNetV3-style CNNs (Howard et al., 2019), written the way ``torch.onnx.export`` writes torchvision's model.

A bottleneck block with kernel ``k``, expansion to ``e`` channels, ``c_in → c_out``, stride ``s``, activation
``act`` (ReLU or HardSwish) and an optional squeeze-and-excitation (SE) gate computes

    h = act(BN(Conv1x1(x)))                         expand to e channels (skipped when e = c_in)
    h = act(BN(DepthwiseConvkxk_s(h)))              group = e: one k×k filter per channel
    h = h · HardSigmoid(Conv1x1(Relu(Conv1x1(GlobalAveragePool(h)))))     SE, squeeze to make_divisible(e/4)
    y = BN(Conv1x1(h))                              linear projection, no activation
    y = y + x                                       only when s = 1 and c_in = c_out

with ``HardSigmoid(v) = max(0, min(1, v/6 + 1/2))`` (ONNX ``HardSigmoid(alpha=1/6, beta=0.5)``, what torch exports
for ``nn.Hardsigmoid``) and ``HardSwish(v) = v · HardSigmoid(v) = v · ReLU6(v + 3) / 6``. The SE convolutions carry
biases; the SE gate multiplies the block's activation per channel (``Mul`` broadcasting N×C×1×1 over N×C×H×W).

Exporters spell these functions differently, and a quantizer meets all of them, so ``hardswish`` chooses:

- ``"op"``: the opset-14 ``HardSwish`` operator (torch.onnx at opset ≥ 14);
- ``"hardsigmoid"``: ``Mul(v, HardSigmoid(v))`` (torch.onnx below opset 14);
- ``"relu6"``: ``Div(Mul(v, Clip(Add(v, 3), 0, 6)), 6)``, the hand-written ``x * F.relu6(x + 3) / 6`` of many
  MobileNetV3 ports.

``fold_batch_norm=True`` writes each Conv+BN as one Conv with a bias (torch.onnx in eval mode with constant folding,
its default); ``False`` keeps inference-form BatchNormalization nodes (``training=TrainingMode.PRESERVE``).
BatchNorm statistics are the identity (gamma 1, beta 0, mean 0, var 1) either way, so the folded weight is the
unfolded one divided by ``sqrt(1 + epsilon)`` and the folded bias is zero.

Layouts (each block is ``(k, e, c_out, se, act, s)``), torchvision's tables:

- ``"mobilenet_v3_large"``: 3x3/2 stem with 16 channels (HardSwish), 15 blocks, 1x1 conv to 960 (HardSwish),
  GlobalAveragePool, Flatten, Gemm 960→1280, HardSwish, Gemm 1280→1000; 5,483,032 parameters at 3×224×224.
- ``"mobilenet_v3_small"``: 16-channel stem, 11 blocks, 1x1 conv to 576, Gemm 576→1024→1000; 2,542,856 parameters.
- ``"tiny"``: for 1×28×28 inputs and 10 classes, five blocks covering every block kind (with and without SE,
  expansion, residual, ReLU and HardSwish, 3x3 and 5x5 depthwise), for tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from qgraph.models.common import GraphBuilder, validate_input_shape
from qgraph.models.mobilenet_v2 import make_divisible

logger = logging.getLogger(__name__)

HARDSWISH_SPELLINGS = ("op", "hardsigmoid", "relu6")
#: torch.onnx's HardSigmoid attributes for ``nn.Hardsigmoid``: relu6(x + 3) / 6 = clip(x/6 + 1/2, 0, 1).
HARDSIGMOID_ALPHA = 1.0 / 6.0
HARDSIGMOID_BETA = 0.5
BATCH_NORM_EPSILON = 1e-3  # torchvision's MobileNetV3 uses eps=0.001


@dataclass(frozen=True)
class BottleneckBlock:
    """One MobileNetV3 block: depthwise kernel, expanded channels, output channels, SE gate, activation, stride."""

    kernel: int
    expanded: int
    channels: int
    squeeze_excite: bool
    activation: str  # "relu" or "hardswish"
    stride: int


@dataclass(frozen=True)
class MobileNetV3Layout:
    stem_channels: int
    blocks: tuple[BottleneckBlock, ...]
    last_channels: int
    classifier_hidden: int


def _blocks(*rows: tuple[int, int, int, bool, str, int]) -> tuple[BottleneckBlock, ...]:
    names = {"RE": "relu", "HS": "hardswish"}
    return tuple(BottleneckBlock(k, e, c, se, names[act], s) for k, e, c, se, act, s in rows)


MOBILENET_V3_LAYOUTS: dict[str, MobileNetV3Layout] = {
    "mobilenet_v3_large": MobileNetV3Layout(
        stem_channels=16, last_channels=960, classifier_hidden=1280,
        blocks=_blocks(
            (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
            (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
            (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
            (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
            (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
        ),
    ),
    "mobilenet_v3_small": MobileNetV3Layout(
        stem_channels=16, last_channels=576, classifier_hidden=1024,
        blocks=_blocks(
            (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
            (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
            (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
            (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
        ),
    ),
    "tiny": MobileNetV3Layout(
        stem_channels=16, last_channels=96, classifier_hidden=128,
        blocks=_blocks(
            (3, 16, 16, True, "RE", 1), (3, 48, 24, False, "RE", 2), (5, 72, 24, True, "HS", 1),
            (5, 96, 40, True, "HS", 2), (3, 120, 40, False, "HS", 1),
        ),
    ),
}

MOBILENET_V3_DEFAULTS: dict[str, tuple[tuple[int, int, int], int]] = {
    "mobilenet_v3_large": ((3, 224, 224), 1000),
    "mobilenet_v3_small": ((3, 224, 224), 1000),
    "tiny": ((1, 28, 28), 10),
}


class _MobileNetV3Writer:
    """Writes the blocks into a :class:`GraphBuilder` with the chosen HardSwish spelling and BatchNorm form."""

    def __init__(self, builder: GraphBuilder, *, hardswish: str, fold_batch_norm: bool) -> None:
        self.builder = builder
        self.hardswish_spelling = hardswish
        self.fold_batch_norm = fold_batch_norm

    def hardsigmoid(self, x: str) -> str:
        return self.builder.node("HardSigmoid", [x], alpha=HARDSIGMOID_ALPHA, beta=HARDSIGMOID_BETA)

    def hardswish(self, x: str) -> str:
        builder = self.builder
        if self.hardswish_spelling == "op":
            return builder.node("HardSwish", [x])
        if self.hardswish_spelling == "hardsigmoid":
            return builder.node("Mul", [x, self.hardsigmoid(x)])
        shifted = builder.node("Add", [x, builder.constant(3.0)])
        clipped = builder.node("Clip", [shifted, builder.constant(0.0), builder.constant(6.0)])
        product = builder.node("Mul", [x, clipped])
        return builder.node("Div", [product, builder.constant(6.0)])

    def activate(self, x: str, activation: str | None) -> str:
        if activation == "relu":
            return self.builder.relu(x)
        if activation == "hardswish":
            return self.hardswish(x)
        return x

    def conv_bn(self, x: str, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, group: int = 1,
                activation: str | None, name: str) -> str:
        """Conv → BatchNorm → activation, or the folded Conv (bias) → activation."""
        builder = self.builder
        if not self.fold_batch_norm:
            y = builder.conv(x, in_channels, out_channels, kernel, stride=stride, group=group, name=name)
            return self.activate(builder.batch_norm(y, out_channels, epsilon=BATCH_NORM_EPSILON, name=f"{name}_bn"),
                                 activation)
        y = builder.conv(x, in_channels, out_channels, kernel, stride=stride, group=group, bias=True, name=name)
        weight = next(tensor for tensor in builder.initializers if tensor.name == f"{name}.weight")
        folded = onnx.numpy_helper.to_array(weight) / np.float32(np.sqrt(1.0 + BATCH_NORM_EPSILON))
        weight.CopyFrom(onnx.numpy_helper.from_array(folded.astype(np.float32), weight.name))
        return self.activate(y, activation)

    def squeeze_excite(self, x: str, channels: int, name: str) -> str:
        """GlobalAveragePool → Conv1x1 → Relu → Conv1x1 → HardSigmoid → Mul (torchvision's SE; biased convs)."""
        builder = self.builder
        squeezed = make_divisible(channels / 4)
        pooled = builder.node("GlobalAveragePool", [x], name=f"{name}_pool")
        h = builder.conv(pooled, channels, squeezed, 1, bias=True, name=f"{name}_fc1")
        h = builder.relu(h)
        h = builder.conv(h, squeezed, channels, 1, bias=True, name=f"{name}_fc2")
        return builder.node("Mul", [x, self.hardsigmoid(h)], name=f"{name}_scale")

    def block(self, x: str, in_channels: int, block: BottleneckBlock, name: str) -> str:
        h = x
        if block.expanded != in_channels:
            h = self.conv_bn(h, in_channels, block.expanded, 1, activation=block.activation, name=f"{name}_expand")
        h = self.conv_bn(h, block.expanded, block.expanded, block.kernel, stride=block.stride, group=block.expanded,
                         activation=block.activation, name=f"{name}_depthwise")
        if block.squeeze_excite:
            h = self.squeeze_excite(h, block.expanded, name=f"{name}_se")
        h = self.conv_bn(h, block.expanded, block.channels, 1, activation=None, name=f"{name}_project")
        if block.stride == 1 and in_channels == block.channels:
            h = self.builder.node("Add", [h, x], name=f"{name}_add")
        return h


def build_mobilenet_v3(
    layout: str | MobileNetV3Layout = "mobilenet_v3_large",
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    hardswish: str = "op",
    fold_batch_norm: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """A MobileNetV3 as an opset-17 ONNX model (input ``input``: batch×C×H×W, output ``logits``).

    ``layout`` is ``"mobilenet_v3_large"``, ``"mobilenet_v3_small"``, ``"tiny"`` or a custom
    :class:`MobileNetV3Layout`; ``hardswish`` one of :data:`HARDSWISH_SPELLINGS`; ``fold_batch_norm`` writes Conv
    with bias instead of Conv → BatchNormalization. ``input_shape`` and ``num_classes`` default to 3×224×224/1000
    for the ImageNet layouts and 1×28×28/10 otherwise.
    """
    if isinstance(layout, str):
        if layout not in MOBILENET_V3_LAYOUTS:
            raise ValueError(f"unknown MobileNetV3 layout {layout!r}; choose from {sorted(MOBILENET_V3_LAYOUTS)}")
        layout_name, (default_shape, default_classes) = layout, MOBILENET_V3_DEFAULTS[layout]
        layout = MOBILENET_V3_LAYOUTS[layout]
    else:
        layout_name, (default_shape, default_classes) = "custom", MOBILENET_V3_DEFAULTS["tiny"]
    if hardswish not in HARDSWISH_SPELLINGS:
        raise ValueError(f"unknown HardSwish spelling {hardswish!r}; choose from {', '.join(HARDSWISH_SPELLINGS)}")
    channels, height, width = validate_input_shape(input_shape or default_shape, num_classes or default_classes)
    num_classes = num_classes or default_classes

    builder = GraphBuilder(seed=seed)
    writer = _MobileNetV3Writer(builder, hardswish=hardswish, fold_batch_norm=fold_batch_norm)
    x = writer.conv_bn("input", channels, layout.stem_channels, 3, stride=2, activation="hardswish", name="stem")
    in_channels = layout.stem_channels
    for index, block in enumerate(layout.blocks, start=1):
        x = writer.block(x, in_channels, block, name=f"block{index}")
        in_channels = block.channels
    x = writer.conv_bn(x, in_channels, layout.last_channels, 1, activation="hardswish", name="head_conv")
    x = builder.node("GlobalAveragePool", [x], name="avgpool")
    x = builder.node("Flatten", [x], name="flatten", axis=1)
    x = builder.gemm(x, layout.last_channels, layout.classifier_hidden, name="classifier_hidden")
    x = writer.hardswish(x)
    x = builder.gemm(x, layout.classifier_hidden, num_classes, name="classifier")
    return builder.build_model(x, input_shape=(channels, height, width), num_classes=num_classes,
                               graph_name=f"mobilenet_v3_{layout_name}",
                               doc_string=f"qgraph reference MobileNetV3 ({layout_name}), HardSwish as {hardswish}, "
                                          f"BatchNorm {'folded' if fold_batch_norm else 'kept'}, seed {seed}")

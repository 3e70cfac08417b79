"""MobileNetV2-style CNNs built from inverted residual blocks (Sandler et al., 2018).

An inverted residual block with expansion ``t``, stride ``s`` and ``c_in → c_out`` channels computes

    h = ReLU6(BN(Conv1x1(x)))                      expand to t·c_in channels (skipped when t = 1)
    h = ReLU6(BN(DepthwiseConv3x3_s(h)))           group = channels: one 3x3 filter per channel
    y = BN(Conv1x1(h))                             linear projection to c_out, no activation
    y = y + x                                      only when s = 1 and c_in = c_out

ReLU6 is written as ``Clip(x, min=0, max=6)`` with the bounds as initializer inputs (opset ≥ 11 form), which is how
exporters write it and what the quantizer must recognise as a clamp it can absorb into the output range.
Depthwise convolutions are the hard case for per-tensor weight quantization (each channel has its own 9 weights and
very different ranges), which is why this model is in the reference set.

Layouts (each stage is ``(t, c, n, s)``: expansion, output channels, blocks, stride of the first block):

- ``"mobilenet_v2"``: the ImageNet network — 3x3/2 stem with 32 channels, stages (1,16,1,1) (6,24,2,2) (6,32,3,2)
  (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), a 1x1 conv to 1280 channels, GlobalAveragePool, Flatten, Gemm;
  3.50M parameters for 1000 classes at 3×224×224 (width multiplier 1.0).
- ``"small"``: for 28×28 grayscale — 3x3/1 stem with 16 channels, stages (1,16,1,1) (6,24,2,2) (6,32,3,2)
  (6,64,2,1), 28×28 → 14×14 → 7×7, a 1x1 conv to 256 channels and the same head; 0.15M parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from qgraph.models.common import GraphBuilder, validate_input_shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InvertedResidualStage:
    """``n`` inverted residual blocks with expansion ``t``, ``c`` output channels, first-block stride ``s``."""

    expansion: int
    channels: int
    blocks: int
    stride: int


@dataclass(frozen=True)
class MobileNetV2Layout:
    stem_channels: int
    stem_stride: int
    stages: tuple[InvertedResidualStage, ...]
    last_channels: int


def _stages(*rows: tuple[int, int, int, int]) -> tuple[InvertedResidualStage, ...]:
    return tuple(InvertedResidualStage(*row) for row in rows)


MOBILENET_V2_LAYOUTS: dict[str, MobileNetV2Layout] = {
    "mobilenet_v2": MobileNetV2Layout(
        stem_channels=32, stem_stride=2, last_channels=1280,
        stages=_stages((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)),
    ),
    "small": MobileNetV2Layout(
        stem_channels=16, stem_stride=1, last_channels=256,
        stages=_stages((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 1)),
    ),
}

MOBILENET_V2_DEFAULTS: dict[str, tuple[tuple[int, int, int], int]] = {
    "mobilenet_v2": ((3, 224, 224), 1000),
    "small": ((1, 28, 28), 10),
}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` without dropping more than 10% (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _inverted_residual(builder: GraphBuilder, x: str, in_channels: int, out_channels: int, stride: int,
                       expansion: int, name: str) -> str:
    hidden = in_channels * expansion
    h = x
    if expansion != 1:
        h = builder.conv_bn(h, in_channels, hidden, 1, activation="relu6", name=f"{name}_expand")
    h = builder.conv_bn(h, hidden, hidden, 3, stride=stride, group=hidden, activation="relu6",
                        name=f"{name}_depthwise")
    h = builder.conv_bn(h, hidden, out_channels, 1, activation=None, name=f"{name}_project")
    if stride == 1 and in_channels == out_channels:
        h = builder.node("Add", [h, x], name=f"{name}_add")
    return h


def build_mobilenet_v2(
    layout: str | MobileNetV2Layout = "mobilenet_v2",
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    width_multiplier: float = 1.0,
    seed: int = 0,
) -> onnx.ModelProto:
    """A MobileNetV2 as an opset-17 ONNX model (input ``input``: batch×C×H×W, output ``logits``).

    ``layout`` is ``"mobilenet_v2"``, ``"small"`` or a custom :class:`MobileNetV2Layout`; ``width_multiplier``
    scales every channel count (rounded to multiples of 8; the last 1x1 conv is never narrowed below its layout
    width, as in the paper). ``input_shape`` and ``num_classes`` default to 3×224×224/1000 for the full layout and
    1×28×28/10 otherwise.
    """
    if isinstance(layout, str):
        if layout not in MOBILENET_V2_LAYOUTS:
            raise ValueError(f"unknown MobileNetV2 layout {layout!r}; choose from {sorted(MOBILENET_V2_LAYOUTS)}")
        layout_name, default_shape, default_classes = layout, *MOBILENET_V2_DEFAULTS[layout]
        layout = MOBILENET_V2_LAYOUTS[layout]
    else:
        layout_name, (default_shape, default_classes) = "custom", MOBILENET_V2_DEFAULTS["small"]
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
    channels, height, width = validate_input_shape(input_shape or default_shape, num_classes or default_classes)
    num_classes = num_classes or default_classes

    builder = GraphBuilder(seed=seed)
    in_channels = make_divisible(layout.stem_channels * width_multiplier)
    x = builder.conv_bn("input", channels, in_channels, 3, stride=layout.stem_stride, activation="relu6",
                        name="stem")
    for stage_index, stage in enumerate(layout.stages, start=1):
        out_channels = make_divisible(stage.channels * width_multiplier)
        for block in range(stage.blocks):
            stride = stage.stride if block == 0 else 1
            x = _inverted_residual(builder, x, in_channels, out_channels, stride, stage.expansion,
                                   name=f"stage{stage_index}_{block}")
            in_channels = out_channels
    last_channels = make_divisible(layout.last_channels * max(1.0, width_multiplier))
    x = builder.conv_bn(x, in_channels, last_channels, 1, activation="relu6", name="head_conv")
    x = builder.node("GlobalAveragePool", [x], name="avgpool")
    x = builder.node("Flatten", [x], name="flatten", axis=1)
    x = builder.gemm(x, last_channels, num_classes, name="classifier")
    return builder.build_model(x, input_shape=(channels, height, width), num_classes=num_classes,
                               graph_name=f"mobilenet_v2_{layout_name}",
                               doc_string=f"qgraph reference MobileNetV2 ({layout_name}), width "
                                          f"{width_multiplier}, seed {seed}")

"""ResNet-style CNNs with BasicBlocks and residual ``Add`` (He et al., 2015).

A BasicBlock computes ``y = ReLU(BN(Conv3x3(ReLU(BN(Conv3x3(x))))) + shortcut(x))`` where the shortcut is the
identity, or ``BN(Conv1x1, stride s)(x)`` when the block changes the channel count or the resolution. The graph keeps
every BatchNormalization (inference form) so that BN folding has work to do, and the residual ``Add`` joins two
quantized branches — the case where targets such as TensorRT require one shared scale.

Layouts:

- ``"resnet18"``: the standard ImageNet ResNet-18 — 7x7/2 stem with 64 channels, 3x3/2 MaxPool, four stages of two
  BasicBlocks with 64/128/256/512 channels (stride 2 at the start of stages 2–4), GlobalAveragePool, Flatten, Gemm.
  11.69M parameters for 1000 classes at 3×224×224.
- ``"small"``: for 28×28 grayscale images (Fashion-MNIST) — 3x3/1 stem with 32 channels, no MaxPool, three stages
  with 32/64/128 channels and (1, 2, 2) BasicBlocks, so 28×28 → 14×14 → 7×7 before pooling; 0.68M parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from qgraph.models.common import GraphBuilder, validate_input_shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResNetLayout:
    """The shape of a BasicBlock ResNet: stem, optional max-pool, and stages of (channels, blocks)."""

    stem_channels: int
    stem_kernel: int
    stem_stride: int
    use_max_pool: bool
    stage_channels: tuple[int, ...]
    blocks_per_stage: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.stage_channels) != len(self.blocks_per_stage) or not self.stage_channels:
            raise ValueError("stage_channels and blocks_per_stage must be non-empty and of equal length")


RESNET_LAYOUTS: dict[str, ResNetLayout] = {
    "resnet18": ResNetLayout(stem_channels=64, stem_kernel=7, stem_stride=2, use_max_pool=True,
                             stage_channels=(64, 128, 256, 512), blocks_per_stage=(2, 2, 2, 2)),
    "small": ResNetLayout(stem_channels=32, stem_kernel=3, stem_stride=1, use_max_pool=False,
                          stage_channels=(32, 64, 128), blocks_per_stage=(1, 2, 2)),
}

#: Default (input_shape, num_classes) per named layout.
RESNET_DEFAULTS: dict[str, tuple[tuple[int, int, int], int]] = {
    "resnet18": ((3, 224, 224), 1000),
    "small": ((1, 28, 28), 10),
}


def _basic_block(builder: GraphBuilder, x: str, in_channels: int, out_channels: int, stride: int,
                 name: str) -> str:
    branch = builder.conv_bn(x, in_channels, out_channels, 3, stride=stride, name=f"{name}_conv1")
    branch = builder.conv_bn(branch, out_channels, out_channels, 3, activation=None, name=f"{name}_conv2")
    shortcut = x
    if stride != 1 or in_channels != out_channels:
        shortcut = builder.conv_bn(x, in_channels, out_channels, 1, stride=stride, activation=None,
                                   name=f"{name}_downsample")
    summed = builder.node("Add", [branch, shortcut], name=f"{name}_add")
    return builder.node("Relu", [summed], name=f"{name}_relu")


def build_resnet(
    layout: str | ResNetLayout = "resnet18",
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """A ResNet with BasicBlocks as an opset-17 ONNX model (input ``input``: batch×C×H×W, output ``logits``).

    ``layout`` is ``"resnet18"``, ``"small"`` or a custom :class:`ResNetLayout`; ``input_shape`` (channels, height,
    width) and ``num_classes`` default to 3×224×224/1000 for ``resnet18`` and 1×28×28/10 otherwise.
    """
    if isinstance(layout, str):
        if layout not in RESNET_LAYOUTS:
            raise ValueError(f"unknown ResNet layout {layout!r}; choose from {sorted(RESNET_LAYOUTS)}")
        layout_name, default_shape, default_classes = layout, *RESNET_DEFAULTS[layout]
        layout = RESNET_LAYOUTS[layout]
    else:
        layout_name, (default_shape, default_classes) = "custom", RESNET_DEFAULTS["small"]
    channels, height, width = validate_input_shape(input_shape or default_shape, num_classes or default_classes)
    num_classes = num_classes or default_classes

    builder = GraphBuilder(seed=seed)
    x = builder.conv_bn("input", channels, layout.stem_channels, layout.stem_kernel, stride=layout.stem_stride,
                        name="stem")
    if layout.use_max_pool:
        x = builder.node("MaxPool", [x], name="stem_maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    in_channels = layout.stem_channels
    for stage, (out_channels, blocks) in enumerate(zip(layout.stage_channels, layout.blocks_per_stage), start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(builder, x, in_channels, out_channels, stride, name=f"layer{stage}_{block}")
            in_channels = out_channels
    x = builder.node("GlobalAveragePool", [x], name="avgpool")
    x = builder.node("Flatten", [x], name="flatten", axis=1)
    x = builder.gemm(x, in_channels, num_classes, name="fc")
    return builder.build_model(x, input_shape=(channels, height, width), num_classes=num_classes,
                               graph_name=f"resnet_{layout_name}",
                               doc_string=f"qgraph reference ResNet ({layout_name}), seed {seed}")

"""ViT-style transformer encoders for images (Dosovitskiy et al., 2020), written with plain ONNX operators.

The graph is what an exporter writes for a pre-norm ViT, so that the quantizer meets MatMul-based attention rather
than a fused operator:

- **patch embedding**: ``Conv(kernel = stride = patch)`` maps batch×C×H×W to batch×D×(H/p)×(W/p); ``Reshape`` to
  batch×D×N and ``Transpose`` to batch×N×D tokens (N = H·W / p²); a learned position embedding (1×N×D) is added.
- **encoder block** (``depth`` of them), pre-norm:

      h = x + Wo · Attention(LN1(x))
      y = h + W2 · GELU(W1 · LN2(h) + b1) + b2

  Attention projects ``q, k, v = LN1(x)·Wq + bq, …`` (three MatMul+Add), splits heads with
  ``Reshape(batch, N, heads, d) → Transpose``, computes ``Softmax(q·kᵀ · 1/sqrt(d))·v`` with MatMul and a scalar
  ``Mul``, merges heads with ``Transpose → Reshape(batch, N, D)`` and projects with ``Wo``. ``Reshape`` uses 0 to
  copy the symbolic batch dimension. GELU is the exact ``x · 0.5 · (1 + Erf(x / sqrt(2)))``.
- **head**: mean over tokens (``ReduceMean`` axes=[1], opset-17 attribute form), final LayerNormalization,
  ``Gemm`` to the classes.

Initialisation: patch embedding He-normal, dense layers Glorot-uniform with zero bias, position embedding
``N(0, 0.02²)``, LayerNorm scale 1 / bias 0. There is no BatchNorm in a ViT.

Layouts:

- ``"small"``: 28×28 grayscale, patch 4 (49 tokens), dimension 64, 4 blocks, 4 heads, MLP ratio 2; 0.14M parameters.
- ``"vit_tiny"``: DeiT-Tiny at 3×224×224 — patch 16 (196 tokens), dimension 192, 12 blocks, 3 heads, MLP ratio 4;
  5.72M parameters (mean pooling instead of a class token), for benchmarks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from qgraph.models.common import GraphBuilder, validate_input_shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViTLayout:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if min(self.patch_size, self.embed_dim, self.depth, self.num_heads) < 1 or self.mlp_ratio <= 0:
            raise ValueError(f"invalid ViT layout {self}")


VIT_LAYOUTS: dict[str, ViTLayout] = {
    "small": ViTLayout(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    "vit_tiny": ViTLayout(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
}

VIT_DEFAULTS: dict[str, tuple[tuple[int, int, int], int]] = {
    "small": ((1, 28, 28), 10),
    "vit_tiny": ((3, 224, 224), 1000),
}


def _attention(builder: GraphBuilder, x: str, tokens: int, layout: ViTLayout, name: str) -> str:
    dim, heads = layout.embed_dim, layout.num_heads
    head_dim = dim // heads
    split_shape = builder.constant([0, tokens, heads, head_dim], np.int64)

    def heads_of(projection: str, perm: list[int]) -> str:
        projected = builder.linear(x, dim, dim, name=f"{name}_{projection}")
        reshaped = builder.node("Reshape", [projected, split_shape], name=f"{name}_{projection}_reshape")
        return builder.node("Transpose", [reshaped], name=f"{name}_{projection}_transpose", perm=perm)

    query = heads_of("query", [0, 2, 1, 3])      # batch×heads×N×d
    key = heads_of("key", [0, 2, 3, 1])          # batch×heads×d×N
    value = heads_of("value", [0, 2, 1, 3])      # batch×heads×N×d
    scores = builder.node("MatMul", [query, key], name=f"{name}_scores")
    scores = builder.node("Mul", [scores, builder.constant(1.0 / math.sqrt(head_dim))], name=f"{name}_scale")
    weights = builder.node("Softmax", [scores], name=f"{name}_softmax", axis=-1)
    context = builder.node("MatMul", [weights, value], name=f"{name}_context")
    context = builder.node("Transpose", [context], name=f"{name}_merge_transpose", perm=[0, 2, 1, 3])
    context = builder.node("Reshape", [context, builder.constant([0, tokens, dim], np.int64)],
                           name=f"{name}_merge_reshape")
    return builder.linear(context, dim, dim, name=f"{name}_output")


def _encoder_block(builder: GraphBuilder, x: str, tokens: int, layout: ViTLayout, name: str) -> str:
    dim = layout.embed_dim
    hidden = int(round(dim * layout.mlp_ratio))
    attended = _attention(builder, builder.layer_norm(x, dim, name=f"{name}_ln1"), tokens, layout,
                          name=f"{name}_attention")
    x = builder.node("Add", [x, attended], name=f"{name}_attention_residual")
    h = builder.layer_norm(x, dim, name=f"{name}_ln2")
    h = builder.linear(h, dim, hidden, name=f"{name}_mlp_fc1")
    h = builder.gelu_erf(h)
    h = builder.linear(h, hidden, dim, name=f"{name}_mlp_fc2")
    return builder.node("Add", [x, h], name=f"{name}_mlp_residual")


def build_vit(
    layout: str | ViTLayout = "small",
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """A ViT encoder classifier as an opset-17 ONNX model (input ``input``: batch×C×H×W, output ``logits``).

    ``layout`` is ``"small"`` (28×28 grayscale), ``"vit_tiny"`` (224×224 RGB) or a custom :class:`ViTLayout`;
    height and width must be multiples of the patch size.
    """
    if isinstance(layout, str):
        if layout not in VIT_LAYOUTS:
            raise ValueError(f"unknown ViT layout {layout!r}; choose from {sorted(VIT_LAYOUTS)}")
        layout_name, default_shape, default_classes = layout, *VIT_DEFAULTS[layout]
        layout = VIT_LAYOUTS[layout]
    else:
        layout_name, (default_shape, default_classes) = "custom", VIT_DEFAULTS["small"]
    channels, height, width = validate_input_shape(input_shape or default_shape, num_classes or default_classes)
    num_classes = num_classes or default_classes
    patch, dim = layout.patch_size, layout.embed_dim
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    tokens = (height // patch) * (width // patch)

    builder = GraphBuilder(seed=seed)
    x = builder.conv("input", channels, dim, patch, stride=patch, padding=0, bias=True, name="patch_embed")
    x = builder.node("Reshape", [x, builder.constant([0, dim, tokens], np.int64)], name="patch_flatten")
    x = builder.node("Transpose", [x], name="patch_transpose", perm=[0, 2, 1])
    position = (builder.generator.standard_normal((1, tokens, dim)) * 0.02).astype(np.float32)
    x = builder.node("Add", [x, builder.add_initializer("position_embedding", position)], name="position_add")
    for block in range(layout.depth):
        x = _encoder_block(builder, x, tokens, layout, name=f"block{block}")
    x = builder.node("ReduceMean", [x], name="token_mean", axes=[1], keepdims=0)
    x = builder.layer_norm(x, dim, name="final_ln")
    x = builder.gemm(x, dim, num_classes, name="head")
    return builder.build_model(x, input_shape=(channels, height, width), num_classes=num_classes,
                               graph_name=f"vit_{layout_name}",
                               doc_string=f"qgraph reference ViT ({layout_name}), seed {seed}")

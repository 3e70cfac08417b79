"""An MLP-Mixer classifier (Tolstikhin et al., 2021) as flax/JAX exports it through jax2tf and tf2onnx, at opset 15.

The point of this model is its spellings, not its accuracy (the weights are seeded random ones): every LayerNorm is
written out the way tf2onnx writes flax's ``nn.LayerNorm``, and none of them is a LayerNormalization node, which
does not exist at opset 15. flax computes::

    mean  = E[x]                 mean2 = E[x²]             var = max(0, mean2 − mean²)
    mul   = rsqrt(var + ε) · γ   y = (x − mean) · mul + β

and jax2tf/tf2onnx write that with keepdims-free reductions. Three spellings appear (``spelling=``):

- ``"flax"``: each mean as ``ReduceSum(axes=[-1], keepdims=0) → Mul(·, 1/n)``, put back to rank 3 with
  ``Reshape(·, [-1, T, 1])``; ``x²`` as ``Mul(x, x)``, ``mean²`` as ``Mul(mean, mean)``; ``Max(·, 0)``; ``Add(ε)``;
  rsqrt as ``Sqrt → Reciprocal``; ``Expand`` to x's shape (jax2tf's explicit ``broadcast_in_dim``) before
  ``Mul(·, γ)`` and before ``Sub(x, ·)``; then ``Mul`` and ``Add(β)``;
- ``"pow"``: the same with ``ReduceMean(keepdims=1)``, rsqrt as ``Pow(·, -0.5)`` and γ after the product;
- ``"sum_div"``: ``ReduceSum(keepdims=1) → Div(·, n)``, ``Pow(x, 2)``, no clamp, rsqrt as ``Div(1, Sqrt(·))``.

``spelling="mixed"`` (the default) uses all three in turn, so one model exercises them together.

Architecture (input batch×1×28×28, like the Fashion-MNIST models): patches of 4×4 (T = 49 tokens of 16 values) via
``Reshape → Transpose → Reshape``, a dense embedding to D channels, ``depth`` mixer blocks::

    h = x + W2ᵗ · GELU(W1ᵗ · LN(x)ᵀ)ᵀ          token mixing (over the T axis, through Transpose)
    y = h + W2ᶜ · GELU(W1ᶜ · LN(h))              channel mixing

with GELU as ``jax.nn.gelu``'s default tanh approximation (``x · x · x`` for the cube, as jax writes
``integer_pow``), a final LayerNorm, the mean over tokens and a dense head to 10 classes. Weights are Glorot-uniform
with small seeded biases, γ around 1 and β around 0 (seeded), so the statistics are not trivial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from qgraph.models.common import GraphBuilder

SPELLINGS = ("flax", "pow", "sum_div")
OPSET = 15
TOKENS = 49
PATCH = 4
LAYER_NORM_EPSILON = 1e-6


def _mean(builder: GraphBuilder, x: str, features: int, spelling: str) -> str:
    """E[x] over the last axis, kept as batch×T×1, in the spelling's form."""
    if spelling == "flax":
        total = builder.node("ReduceSum", [x, builder.constant([-1], np.int64)], keepdims=0)
        mean = builder.node("Mul", [total, builder.constant(1.0 / features)])
        return builder.node("Reshape", [mean, builder.constant([-1, TOKENS, 1], np.int64)])
    if spelling == "pow":
        return builder.node("ReduceMean", [x], axes=[-1], keepdims=1)
    total = builder.node("ReduceSum", [x, builder.constant([-1], np.int64)], keepdims=1)
    return builder.node("Div", [total, builder.constant(float(features))])


def layer_norm(builder: GraphBuilder, x: str, features: int, spelling: str, *, name: str) -> str:
    """flax's LayerNorm over the last axis of a batch×T×features tensor, as tf2onnx writes it."""
    gamma = (1.0 + 0.1 * builder.generator.standard_normal(features)).astype(np.float32)
    beta = (0.1 * builder.generator.standard_normal(features)).astype(np.float32)
    gamma_name = builder.add_initializer(f"{name}.scale", gamma)
    beta_name = builder.add_initializer(f"{name}.bias", beta)
    mean = _mean(builder, x, features, spelling)
    if spelling == "sum_div":
        square = builder.node("Pow", [x, builder.constant(2.0)])
    else:
        square = builder.node("Mul", [x, x])
    second_moment = _mean(builder, square, features, spelling)
    mean_square = builder.node("Mul", [mean, mean])
    variance = builder.node("Sub", [second_moment, mean_square])
    if spelling == "flax":
        variance = builder.node("Max", [variance, builder.constant(0.0)])
    shifted = builder.node("Add", [variance, builder.constant(LAYER_NORM_EPSILON)])
    if spelling == "flax":
        full_shape = builder.constant([1, TOKENS, features], np.int64)
        inverse = builder.node("Reciprocal", [builder.node("Sqrt", [shifted])])
        inverse = builder.node("Expand", [inverse, full_shape])
        factor = builder.node("Mul", [inverse, gamma_name])
        centred = builder.node("Sub", [x, builder.node("Expand", [mean, full_shape])])
        normalised = builder.node("Mul", [centred, factor])
    else:
        if spelling == "pow":
            inverse = builder.node("Pow", [shifted, builder.constant(-0.5)])
        else:
            inverse = builder.node("Div", [builder.constant(1.0), builder.node("Sqrt", [shifted])])
        centred = builder.node("Sub", [x, mean])
        normalised = builder.node("Mul", [builder.node("Mul", [centred, inverse]), gamma_name])
    return builder.node("Add", [normalised, beta_name], name=f"{name}_out")


def gelu_tanh(builder: GraphBuilder, x: str) -> str:
    """``jax.nn.gelu(x)`` (approximate=True): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), x³ as x·(x·x)."""
    cube = builder.node("Mul", [x, builder.node("Mul", [x, x])])
    inner = builder.node("Add", [x, builder.node("Mul", [cube, builder.constant(0.044715)])])
    tanh = builder.node("Tanh", [builder.node("Mul", [inner, builder.constant(math.sqrt(2.0 / math.pi))])])
    shifted = builder.node("Add", [tanh, builder.constant(1.0)])
    return builder.node("Mul", [builder.node("Mul", [x, builder.constant(0.5)]), shifted])


def _dense(builder: GraphBuilder, x: str, in_features: int, out_features: int, *, name: str) -> str:
    weight = builder.glorot_uniform(in_features, out_features, (in_features, out_features))
    bias = (0.05 * builder.generator.standard_normal(out_features)).astype(np.float32)
    product = builder.node("MatMul", [x, builder.add_initializer(f"{name}.kernel", weight)], name=f"{name}_matmul")
    return builder.node("Add", [product, builder.add_initializer(f"{name}.bias", bias)], name=f"{name}_add")


def build_flax_mixer(
    *, depth: int = 2, channels: int = 32, token_hidden: int = 32, channel_hidden: int = 64,
    spelling: str = "mixed", num_classes: int = 10, seed: int = 0,
) -> onnx.ModelProto:
    """The MLP-Mixer classifier described in the module docstring (input ``input``, output ``logits``)."""
    if spelling != "mixed" and spelling not in SPELLINGS:
        raise ValueError(f"unknown spelling {spelling!r}; choose from mixed, {', '.join(SPELLINGS)}")
    if min(depth, channels, token_hidden, channel_hidden, num_classes) < 1:
        raise ValueError("depth, widths and the class count must be positive")
    builder = GraphBuilder(seed=seed)
    order: Sequence[str] = SPELLINGS if spelling == "mixed" else (spelling,)
    norms = iter(range(10 ** 6))

    def next_spelling() -> str:
        return order[next(norms) % len(order)]

    side = 28 // PATCH
    x = builder.node("Reshape", ["input", builder.constant([-1, 1, side, PATCH, side, PATCH], np.int64)])
    x = builder.node("Transpose", [x], perm=[0, 2, 4, 1, 3, 5])
    x = builder.node("Reshape", [x, builder.constant([-1, TOKENS, PATCH * PATCH], np.int64)])
    x = _dense(builder, x, PATCH * PATCH, channels, name="stem")
    for block in range(depth):
        name = f"block{block}"
        h = layer_norm(builder, x, channels, next_spelling(), name=f"{name}_token_norm")
        h = builder.node("Transpose", [h], perm=[0, 2, 1])
        h = gelu_tanh(builder, _dense(builder, h, TOKENS, token_hidden, name=f"{name}_token_fc1"))
        h = _dense(builder, h, token_hidden, TOKENS, name=f"{name}_token_fc2")
        x = builder.node("Add", [x, builder.node("Transpose", [h], perm=[0, 2, 1])])
        h = layer_norm(builder, x, channels, next_spelling(), name=f"{name}_channel_norm")
        h = gelu_tanh(builder, _dense(builder, h, channels, channel_hidden, name=f"{name}_channel_fc1"))
        h = _dense(builder, h, channel_hidden, channels, name=f"{name}_channel_fc2")
        x = builder.node("Add", [x, h])
    x = layer_norm(builder, x, channels, next_spelling(), name="final_norm")
    x = builder.node("ReduceMean", [x], axes=[1], keepdims=0)
    logits = _dense(builder, x, channels, num_classes, name="head")
    producer = next(node for node in reversed(builder.nodes) if logits in node.output)
    producer.output[0] = "logits"
    graph = helper.make_graph(
        builder.nodes, "flax_mixer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tf2onnx",
                              ir_version=8)
    return onnx.shape_inference.infer_shapes(model)

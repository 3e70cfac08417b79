"""Builders of one normalisation (LayerNorm or RMSNorm) in the spellings exporters write, for the fusion tests.

LayerNorm comes from :func:`qgraph.models.flax_layernorm.layer_norm` (flax through jax2tf/tf2onnx, three spellings);
RMSNorm and the broken variants are written here with the same GraphBuilder.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from qgraph.models.common import GraphBuilder
from qgraph.models.flax_layernorm import TOKENS, layer_norm
from qgraph.passes.canonicalize.lift_constants import LiftConstants

FEATURES = 16


def wrap(builder: GraphBuilder, output: str, *, opset: int, features: int = FEATURES) -> onnx.ModelProto:
    """A model with input ``x`` (batch×49×features) and output ``y`` computed by ``builder``'s nodes."""
    producer = next(node for node in reversed(builder.nodes) if output in node.output)
    producer.output[list(producer.output).index(output)] = "y"
    graph = helper.make_graph(
        builder.nodes, "normalisation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TOKENS, features])],
        initializer=builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def flax_layer_norm(spelling: str, *, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """One flax LayerNorm (opset-15 nodes, converted to ``opset`` by onnx's version converter when higher)."""
    builder = GraphBuilder(seed=seed)
    output = layer_norm(builder, "x", FEATURES, spelling, name="norm")
    model = wrap(builder, output, opset=15)
    if opset == 15:
        return model
    # The converter writes ReduceMean's axes (opset 18) as Constant nodes; the pipeline lifts them before fusing.
    converted = ir.serde.deserialize_model(onnx.version_converter.convert_version(model, opset))
    return ir.serde.serialize_model(LiftConstants()(converted).model)


def _reduce_mean(builder: GraphBuilder, value: str, opset: int) -> str:
    if opset >= 18:
        return builder.node("ReduceMean", [value, builder.constant([-1], np.int64)], keepdims=1)
    return builder.node("ReduceMean", [value], axes=[-1], keepdims=1)


def rms_norm(spelling: str = "pow_div", *, opset: int = 17, bias: bool = False, scale: bool = True,
             epsilon: float = 1e-6) -> onnx.ModelProto:
    """``x · rsqrt(mean(x²) + ε) · γ``.

    Spellings: ``"pow_div"`` (Pow(x, 2), ReduceMean, Add ε, Sqrt, Div(x, ·) — Hugging Face T5/LLaMA through
    torch.onnx), ``"reciprocal"`` (Mul(x, x), Sqrt → Reciprocal → Mul), ``"rsqrt_pow"`` (Pow(·, −0.5)),
    ``"sum"`` (ReduceSum then Mul(1/n)).
    """
    builder = GraphBuilder(seed=3)
    gamma = builder.add_initializer("gamma", np.linspace(0.5, 1.5, FEATURES).astype(np.float32))
    square = builder.node("Pow", ["x", builder.constant(2.0)]) if spelling == "pow_div" else builder.node(
        "Mul", ["x", "x"])
    if spelling == "sum":
        axes_inputs = [square, builder.constant([-1], np.int64)]
        mean = builder.node("Mul", [builder.node("ReduceSum", axes_inputs, keepdims=1),
                                    builder.constant(1.0 / FEATURES)])
    else:
        mean = _reduce_mean(builder, square, opset)
    shifted = builder.node("Add", [mean, builder.constant(epsilon)])
    if spelling == "pow_div":
        normalised = builder.node("Div", ["x", builder.node("Sqrt", [shifted])])
    elif spelling == "rsqrt_pow":
        normalised = builder.node("Mul", [builder.node("Pow", [shifted, builder.constant(-0.5)]), "x"])
    else:
        normalised = builder.node("Mul", ["x", builder.node("Reciprocal", [builder.node("Sqrt", [shifted])])])
    output = builder.node("Mul", [gamma, normalised]) if scale else normalised
    if bias:
        output = builder.node("Add", [output, builder.add_initializer("beta", np.full(FEATURES, 0.1, np.float32))])
    return wrap(builder, output, opset=opset)

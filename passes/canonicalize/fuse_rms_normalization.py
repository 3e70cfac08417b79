"""FuseRmsNormalization: recognise an RMSNorm written out node by node and keep it as one node, a model-local
function ``qgraph.fused::RMSNormalization``.

RMSNorm (Zhang & Sennrich, 2019) over the k trailing axes A of x is::

    y = x · (E_A[x²] + ε)^(−1/2) · γ

spelled ``Pow(x, 2)`` or ``Mul(x, x)`` → ReduceMean (or ReduceSum then 1/n) → ``Add(ε)`` → ``Sqrt → Div(x, ·)``,
``Sqrt → Reciprocal → Mul``, ``Pow(·, −0.5)`` or ``Div(1, Sqrt)`` → ``Mul(·, γ)`` (γ before or after, optional), with
the same views as LayerNorm (see :mod:`qgraph.passes.canonicalize._normalization_matching`).

Why a local function and not an operator: onnxruntime 1.19.2's CPU provider registers its
``SimplifiedLayerNormalization`` kernel in the *default* domain (measured: ``com.microsoft`` gives "not a registered
function"; the default domain runs), where ``onnx.checker`` rejects it as an unknown operator, and ONNX's own
RMSNormalization arrives in opset 23, beyond what that runtime loads (21). A function node passes the checker, and
onnxruntime inlines its body, so it runs the same element-wise arithmetic as before (to float32 rounding: the
body's ``Mul(x, x)`` and ``Reciprocal → Mul`` stand for an exporter's ``Pow(x, 2)`` or ``Div``; measured ≤ 5e-7). What
it gains is that annotation sees one node whose op it has no integer kernel for, and keeps it FP32 whole, recorded with
its reason. Decomposed, the annotator would quantize the product ``x · r`` as a multiplication of two activations —
which puts the reciprocal root r, a per-row factor whose range over a batch spans orders of magnitude, on an 8-bit grid
— and the sensitivity search would then have to find that piece and put it back by hand. The integer MatMul after the
norm still gets its quantized input (the norm's output is quantized where its reader is).

Body (the model's default-domain opset, ReduceMean axes as attribute before opset 18 and as input from 18)::

    RMSNormalization<axes, epsilon>(X, scale) = Mul(Mul(X, Reciprocal(Sqrt(Add(ReduceMean(Mul(X, X), axes), ε)))),
                                                    scale)

Refused: everything the shared matcher refuses, a γ that is not float32, and a model that defines
``qgraph.fused::RMSNormalization`` itself with another body.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from qgraph.passes._rewrite_support import new_initializer
from qgraph.passes.canonicalize import _normalization_matching as normalization
from qgraph.passes.canonicalize._pattern_matching import default_opset, replace_chain
from qgraph.passes.infrastructure import Refusal, RewriteContext, register

logger = logging.getLogger(__name__)

FUSED_DOMAIN = "qgraph.fused"
FUNCTION_NAME = "RMSNormalization"
#: The first default-domain opset in which ReduceMean takes its axes as an input.
_AXES_INPUT_OPSET = 18


@dataclasses.dataclass(frozen=True)
class RmsNormPlan:
    match: normalization.NormalizationMatch
    scale: np.ndarray


def _reference(name: str, kind: int, function_attribute: str) -> onnx.AttributeProto:
    """A body node's attribute ``name`` that takes the value of the function node's ``function_attribute``."""
    attribute = onnx.AttributeProto()
    attribute.name, attribute.type, attribute.ref_attr_name = name, kind, function_attribute
    return attribute


def rms_function(opset: int) -> onnx.FunctionProto:
    """The body of ``qgraph.fused::RMSNormalization`` for a default-domain ``opset``."""
    nodes = [helper.make_node("Mul", ["X", "X"], ["square"])]
    if opset >= _AXES_INPUT_OPSET:
        axes = helper.make_node("Constant", [], ["axes"])
        axes.attribute.append(_reference("value_ints", onnx.AttributeProto.INTS, "axes"))
        mean = helper.make_node("ReduceMean", ["square", "axes"], ["mean"], keepdims=1)
        nodes += [axes, mean]
    else:
        mean = helper.make_node("ReduceMean", ["square"], ["mean"], keepdims=1)
        mean.attribute.append(_reference("axes", onnx.AttributeProto.INTS, "axes"))
        nodes.append(mean)
    epsilon = helper.make_node("Constant", [], ["epsilon"])
    epsilon.attribute.append(_reference("value_float", onnx.AttributeProto.FLOAT, "epsilon"))
    nodes += [
        epsilon,
        helper.make_node("Add", ["mean", "epsilon"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["root"]),
        helper.make_node("Reciprocal", ["root"], ["inverse"]),
        helper.make_node("Mul", ["X", "inverse"], ["normalised"]),
        helper.make_node("Mul", ["normalised", "scale"], ["Y"]),
    ]
    return helper.make_function(
        FUSED_DOMAIN, FUNCTION_NAME, ["X", "scale"], ["Y"], nodes, [helper.make_opsetid("", opset)],
        attributes=["axes", "epsilon"],
        doc_string="RMSNorm: X · (mean(X², axes) + epsilon)^(-1/2) · scale",
    )


def _function_conflict(model: ir.Model) -> str | None:
    """Why the function cannot be added to ``model`` (it defines another one of that name), or None."""
    existing = model.functions.get((FUSED_DOMAIN, FUNCTION_NAME, ""))
    if existing is None:
        return None
    wanted = rms_function(default_opset(model)).SerializeToString()
    if ir.serde.serialize_function(existing).SerializeToString() != wanted:
        return f"the model defines its own {FUSED_DOMAIN}::{FUNCTION_NAME}"
    return None


def _ensure_function(model: ir.Model) -> None:
    """Add the function (and its domain import) to ``model`` when missing (``check`` refused any conflict)."""
    key = (FUSED_DOMAIN, FUNCTION_NAME, "")
    if key not in model.functions:
        model.functions[key] = ir.serde.deserialize_function(rms_function(default_opset(model)))
        model.opset_imports.setdefault(FUSED_DOMAIN, 1)


@register
class FuseRmsNormalization(normalization.NormalizationFusion):
    """Keep a decomposed RMSNorm as one qgraph.fused::RMSNormalization function node (FP32 as a whole)."""

    summary = "Keep decomposed RMSNorm (x · rsqrt(mean(x²) + eps) · γ) as one local-function node"
    centred = False

    def plan(self, found: normalization.NormalizationMatch, context: RewriteContext) -> RmsNormPlan | Refusal:
        if found.bias is not None:
            return Refusal("an RMSNorm with a bias (no such normalisation to keep)")
        conflict = _function_conflict(context.model)
        if conflict is not None:
            return Refusal(conflict)
        return RmsNormPlan(found, normalization.broadcast_parameter(found.scale, found.normalized_shape, 1.0))

    def rewrite(self, plan: RmsNormPlan, context: RewriteContext) -> None:
        _ensure_function(context.model)
        match = plan.match
        graph = match.output.producer().graph
        base = match.output.name or "rms_norm"
        scale = new_initializer(graph, context.names, f"{base}_scale", plan.scale)
        fused = ir.Node(
            FUSED_DOMAIN, FUNCTION_NAME, [match.data, scale],
            attributes=[ir.AttrInt64s("axes", list(range(-match.axis_count, 0))),
                        ir.AttrFloat32("epsilon", match.epsilon)],
            name=context.names.fresh(f"{base}_rms_norm"),
        )
        replace_chain(graph, match.nodes, match.output, fused)
        logger.debug("kept %d nodes as %s::%s %s", len(match.nodes), FUSED_DOMAIN, FUNCTION_NAME, fused.name)

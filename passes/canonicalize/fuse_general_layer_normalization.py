"""FuseGeneralLayerNormalization: fuse the LayerNorm spellings that FuseLayerNormalization's fixed chain does not
read — flax/JAX through jax2tf and tf2onnx, Keras, reductions written as sums — into one LayerNormalization.

LayerNormalization (opset 17) over the k trailing axes A of x, with ``n = ∏_{a∈A} dim_a``, is::

    μ  = E_A[x]                  σ² = E_A[(x − μ)²] = E_A[x²] − μ²
    y  = (x − μ) · (σ² + ε)^(−1/2) · γ + β           = LayerNormalization(x, γ, β, axis=−k, epsilon=ε)

flax's ``nn.LayerNorm`` computes ``mean = E[x]``, ``mean2 = E[x²]``, ``var = max(0, mean2 − mean²)``,
``mul = rsqrt(var + ε) · γ``, ``y = (x − mean) · mul + β``; jax2tf writes each mean as a sum over A divided by n
(``ReduceSum`` then ``Mul(·, 1/n)`` or ``Div(·, n)`` in ONNX) without keepdims, puts the axes back with
``Reshape``, broadcasts explicitly with ``Expand`` and writes rsqrt as ``Sqrt`` then ``Reciprocal``. The
``Max(·, 0)`` is exact: it only guards the float cancellation of a quantity that is ≥ 0 (the fused kernel has its
own guard: onnxruntime computes ``E[x²] − μ²`` too and clamps it at 0). Keras folds γ into the reciprocal the same
way. Also recognised: ``Pow(·, −0.5)`` or ``Div(1, Sqrt(·))`` for the reciprocal root, ``Div(x − μ, Sqrt(·))``,
ReduceMean or ReduceSum/n for every mean, the centred variance as well as the moments form. paddle2onnx writes
torch's chain (ReduceMean, Sub, Pow 2, ReduceMean, Add ε, Sqrt, Div, Mul γ, Add β; FuseLayerNormalization fuses it)
and torch.onnx's dynamo exporter writes LayerNormalization itself from opset 17; its decomposition at lower
opsets (``rsqrt`` as Reciprocal(Sqrt)) is covered here. The recognition is in
:mod:`qgraph.passes.canonicalize._normalization_matching`, which lists what is refused and why.

A model whose default-domain opset is below 17 has no LayerNormalization: the match is refused here, and
UpgradeOpsetForFusions (which runs before the fusions in the canonical pipeline) converts such a model to opset 17
when it finds a LayerNorm that would fuse, checking the converted model numerically first.

The fused kernel computes in float32 with its own reduction, so the output matches the decomposed graph to float32
rounding (~1e-6 relative), and better than the moments form for rows with a large mean, whose E[x²] − μ²
cancels.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.passes._rewrite_support import new_initializer
from qgraph.passes.canonicalize import _normalization_matching as normalization
from qgraph.passes.canonicalize._pattern_matching import OpsetRefusal, default_opset, replace_chain
from qgraph.passes.infrastructure import Refusal, RewriteContext, register

logger = logging.getLogger(__name__)

#: The first default-domain opset with LayerNormalization.
MINIMUM_OPSET = 17


@dataclasses.dataclass(frozen=True)
class GeneralLayerNormPlan:
    """A recognised LayerNorm and the fused operator's scale and bias."""

    match: normalization.NormalizationMatch
    scale: np.ndarray
    bias: np.ndarray


@register
class FuseGeneralLayerNormalization(normalization.NormalizationFusion):
    """Fuse LayerNorms spelled with E[x²] − E[x]², ReduceSum/n, Reshape/Expand views, Pow(−0.5) or a folded γ."""

    summary = ("Fuse flax/Keras/tf2onnx LayerNorm spellings (moments, ReduceSum/n, views, rsqrt forms) "
               "into LayerNormalization")
    centred = True

    def plan(self, found: normalization.NormalizationMatch, context: RewriteContext) -> GeneralLayerNormPlan | Refusal:
        opset = default_opset(context.model)
        if opset < MINIMUM_OPSET:
            return OpsetRefusal(
                f"the model imports default-domain opset {opset}; LayerNormalization needs opset {MINIMUM_OPSET} "
                "(UpgradeOpsetForFusions converts the model when the conversion is exact)",
                MINIMUM_OPSET,
            )
        shape = found.normalized_shape
        scale = normalization.broadcast_parameter(found.scale, shape, 1.0)
        bias = normalization.broadcast_parameter(found.bias, shape, 0.0)
        return GeneralLayerNormPlan(found, scale, bias)

    def rewrite(self, plan: GeneralLayerNormPlan, context: RewriteContext) -> None:
        match = plan.match
        graph = match.output.producer().graph
        base = match.output.name or "layer_norm"
        scale = new_initializer(graph, context.names, f"{base}_scale", plan.scale)
        bias = new_initializer(graph, context.names, f"{base}_bias", plan.bias)
        fused = ir.Node(
            "", "LayerNormalization", [match.data, scale, bias],
            attributes=[ir.AttrInt64("axis", -match.axis_count), ir.AttrFloat32("epsilon", match.epsilon)],
            name=context.names.fresh(f"{base}_layer_norm"),
        )
        replace_chain(graph, match.nodes, match.output, fused)
        logger.debug("fused %d nodes into LayerNormalization %s", len(match.nodes), fused.name)

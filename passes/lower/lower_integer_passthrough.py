"""LowerIntegerPassThrough: ``DQ(x) → MaxPool | Reshape | Transpose | Flatten | Squeeze | Unsqueeze → Q(y)``
with identical (scale, zero point, integer type) on x and y runs the op on the integer tensor directly.

These ops only move, select or take the maximum of elements. Dequantization ``d(q) = (q - z)·s`` with ``s > 0`` is
strictly increasing, so for any such op ``f`` (data movement, or a max over a window) ``f(d(q)) = d(f(q))``, and
with the same parameters on both sides ``Q(d(v)) = v`` for every integer ``v`` in range, hence

    Q(f(DQ(xq))) = Q(DQ(f(xq))) = f(xq)        exactly.

MaxPool pads with the type's lowest value, which never wins a window that contains a real element, as ``-inf``
never does in float.

Speed: onnxruntime 1.19.2's NCHW MaxPool for uint8 is a slow generic loop — measured 935 µs against 177 µs for
float on a 1×64×56×56 tensor (one thread) — while ``Transpose → com.microsoft NhwcMaxPool → Transpose`` on uint8
takes 60 µs and gives identical results. So a 2-D MaxPool becomes that sequence (``channels_last_max_pool=True``,
the default); other ranks, or ``channels_last_max_pool=False``, keep an NCHW integer MaxPool. Type constraints checked against the model's default opset: MaxPool takes int8/uint8 from
opset 12, Flatten all types from opset 9, Reshape/Transpose/Squeeze/Unsqueeze all types in every opset.

Refused (logged): different parameters on x and y (a requantization, not an identity), per-channel params,
non-constant params, an opset whose op does not take the integer type, a used MaxPool ``Indices`` output, another
input of the op produced by a DQ, the float result read by anything but the one Q.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.passes.lower import _qdq_patterns as qdq

logger = logging.getLogger(__name__)

#: Op → first default-domain opset in which it accepts uint8/int8 tensors.
MINIMUM_OPSET = {"MaxPool": 12, "Reshape": 1, "Transpose": 1, "Flatten": 9, "Squeeze": 1, "Unsqueeze": 1}


@dataclasses.dataclass(frozen=True)
class _PassThroughPlan:
    """An accepted op: the quantization its input and output share, and the Q that reads its output."""

    node: ir.Node
    params: qdq.QuantParams
    output: qdq.OutputQuantize


@register
class LowerIntegerPassThrough(RewritePass):
    """Run data-movement ops and MaxPool on the integer tensor when input and output share their quantization."""

    phase = Phase.LOWER
    summary = "DQ → MaxPool|Reshape|Transpose|Flatten|Squeeze|Unsqueeze → Q (same params) runs on the integers"

    def __init__(self, *, channels_last_max_pool: bool = True) -> None:
        super().__init__()
        self.channels_last_max_pool = channels_last_max_pool

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not qdq.is_op(node, *MINIMUM_OPSET) or not node.inputs or qdq.dequantize_of(node.inputs[0]) is None:
            return None
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> _PassThroughPlan | Refusal:
        opset = qdq.default_opset(context.model)
        if opset < MINIMUM_OPSET[node.op_type]:
            return Refusal(
                f"{node.op_type} takes integer tensors from opset {MINIMUM_OPSET[node.op_type]}, model has {opset}"
            )
        if any(qdq.dequantize_of(value) is not None for value in node.inputs[1:]):
            return Refusal("another input of the op is dequantized")
        if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
            return Refusal("a secondary output (MaxPool Indices) is used")
        params = qdq.read_params(qdq.dequantize_of(node.inputs[0]))
        if isinstance(params, str):
            return Refusal(params)
        if not params.per_tensor:
            return Refusal("the input is quantized per channel")
        output = qdq.output_quantize(node.outputs[0], allow_activation=False, dtype=params.integer_type)
        if output is None or isinstance(output, str):
            return Refusal(output or f"the {node.op_type} output is read as float (not only by one Q)")
        if not params.same_as(output.params):
            return Refusal("input and output quantization differ (that is a requantization, not a pass-through)")
        return _PassThroughPlan(node, params, output)

    def rewrite(self, plan: _PassThroughPlan, context: RewriteContext) -> None:
        node, params, output = plan.node, plan.params, plan.output
        if node.op_type == "MaxPool" and self.channels_last_max_pool and len(qdq.attribute(node, "kernel_shape")) == 2:
            self._rewrite_channels_last(node, params, output, context.model)
            return
        lowered = ir.Node(
            node.domain, node.op_type, [params.integer_value, *node.inputs[1:]], qdq.copy_attributes(node),
            name=qdq.derived_name(node, "integer"),
        )
        lowered.outputs[0].type = ir.TensorType(params.integer_type)
        qdq.replace_island(context.model, node, output, lowered)

    @staticmethod
    def _rewrite_channels_last(
        node: ir.Node, params: qdq.QuantParams, output: qdq.OutputQuantize, model: ir.Model
    ) -> None:
        """NCHW → NHWC, com.microsoft NhwcMaxPool on the integers, NHWC → NCHW (same max over the same windows)."""
        graph, base = node.graph, node.name or "maxpool"
        to_channels_last = ir.Node(
            "", "Transpose", [params.integer_value], [ir.AttrInt64s("perm", [0, 2, 3, 1])], name=f"{base}_to_nhwc"
        )
        pool = ir.Node(
            qdq.MICROSOFT_DOMAIN, "NhwcMaxPool", [to_channels_last.outputs[0]],
            qdq.copy_attributes(node, drop=("storage_order",)), name=f"{base}_nhwc",
        )
        lowered = ir.Node(
            "", "Transpose", [pool.outputs[0]], [ir.AttrInt64s("perm", [0, 3, 1, 2])], name=f"{base}_to_nchw"
        )
        for value in (to_channels_last.outputs[0], pool.outputs[0], lowered.outputs[0]):
            value.type = ir.TensorType(params.integer_type)
        graph.insert_before(output.quantize, [to_channels_last, pool])
        qdq.replace_island(model, node, output, lowered, contrib=True)

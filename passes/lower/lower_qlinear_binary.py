"""LowerQLinearBinary: ``DQ(a), DQ(b) → Add | Mul → [Relu | Clip] → Q(y)`` becomes com.microsoft
``QLinearAdd`` / ``QLinearMul``.

With ``a = (aq - za)·sa`` and ``b = (bq - zb)·sb`` (uint8, per tensor; either may be a constant):

    QLinearAdd:  yq = saturate(round((sa·(aq - za) + sb·(bq - zb)) / sy) + zy)
    QLinearMul:  yq = saturate(round(sa·sb·(aq - za)(bq - zb) / sy) + zy)

exactly ``Q(DQ(a) ∘ DQ(b))`` up to where the float rounding happens (at most one output step). Broadcasting
follows the ONNX multidirectional rules, as onnxruntime's kernels do. A Relu/Clip before the Q (the contract's fused
activation after a residual Add) is dropped when the output range implies it (see ``_qdq_patterns``).

Refused (logged): an input or the output not uint8 per tensor, non-constant params, the float result read by
anything but the one Q, an activation the output range does not imply.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.infrastructure import RewritePass
from qgraph.passes.infrastructure import Refusal
from qgraph.passes.infrastructure import RewriteContext
from qgraph.passes.infrastructure import Phase
from qgraph.passes.infrastructure import register

logger = logging.getLogger(__name__)

_KERNELS = {"Add": "QLinearAdd", "Mul": "QLinearMul"}


@dataclasses.dataclass(frozen=True)
class _BinaryPlan:
    """An accepted island: the quantization of each operand, in order, and the Q of the output."""

    node: ir.Node
    inputs: tuple[qdq.QuantParams, ...]
    output: qdq.OutputQuantize


@register
class LowerQLinearBinary(RewritePass):
    """Lower QDQ Add/Mul islands to com.microsoft QLinearAdd/QLinearMul."""

    phase = Phase.LOWER
    summary = "DQ, DQ → Add|Mul → [Relu|Clip] → Q becomes QLinearAdd/QLinearMul"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not qdq.is_op(node, *_KERNELS) or len(node.inputs) != 2:
            return None
        if any(qdq.dequantize_of(value) is None for value in node.inputs):
            return None
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> _BinaryPlan | Refusal:
        operands = []
        for value in node.inputs:
            params = qdq.activation_input(value)
            if isinstance(params, str):
                return Refusal(params)
            operands.append(params)
        output = qdq.output_quantize(node.outputs[0])
        if output is None or isinstance(output, str):
            return Refusal(output or f"the {node.op_type} output is read as float (not only by one Q)")
        return _BinaryPlan(node, tuple(operands), output)

    def rewrite(self, plan: _BinaryPlan, context: RewriteContext) -> None:
        node, output = plan.node, plan.output
        graph, anchor = node.graph, output.quantize
        inputs: list[ir.Value] = []
        for params in plan.inputs:
            inputs += [params.integer_value, params.scale, qdq.zero_point_or_new(graph, context.names, params, before=anchor)]
        inputs += [output.params.scale, qdq.zero_point_or_new(graph, context.names, output.params, before=anchor)]
        lowered = ir.Node(qdq.MICROSOFT_DOMAIN, _KERNELS[node.op_type], inputs, name=qdq.derived_name(node, "quant"))
        qdq.replace_island(context.model, node, output, lowered, contrib=True)

"""LowerQLinearConcat: ``DQ(x1), …, DQ(xn) → Concat → Q(y)`` becomes com.microsoft ``QLinearConcat``.

Each input slice is requantized into the output's parameters:

    yq[slice i] = saturate(round(si·(xiq - zi) / sy) + zy)

which is ``Q(Concat(DQ(x1), …, DQ(xn)))`` element by element (exact when every input shares the output's scale and
zero point, as the contract's scale sharing makes them; otherwise at most one output step). Signature:
``QLinearConcat(sy, zy, x1q, s1, z1, …; axis)``.

Refused (logged): an input or the output not uint8 per tensor, non-constant params, the float result read by
anything but the one Q.
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


@dataclasses.dataclass(frozen=True)
class _ConcatPlan:
    """An accepted island: the quantization of each input, in order, and the Q of the output."""

    node: ir.Node
    inputs: tuple[qdq.QuantParams, ...]
    output: qdq.OutputQuantize


@register
class LowerQLinearConcat(RewritePass):
    """Lower a QDQ Concat island to com.microsoft QLinearConcat."""

    phase = Phase.LOWER
    summary = "DQ… → Concat → Q becomes QLinearConcat"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not qdq.is_op(node, "Concat") or not node.inputs:
            return None
        if any(qdq.dequantize_of(value) is None for value in node.inputs):
            return None
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> _ConcatPlan | Refusal:
        pieces = []
        for value in node.inputs:
            params = qdq.activation_input(value)
            if isinstance(params, str):
                return Refusal(params)
            pieces.append(params)
        output = qdq.output_quantize(node.outputs[0], allow_activation=False)
        if output is None or isinstance(output, str):
            return Refusal(output or "the Concat output is read as float (not only by one Q)")
        return _ConcatPlan(node, tuple(pieces), output)

    def rewrite(self, plan: _ConcatPlan, context: RewriteContext) -> None:
        node, output = plan.node, plan.output
        graph, anchor = node.graph, output.quantize
        inputs = [output.params.scale, qdq.zero_point_or_new(graph, context.names, output.params, before=anchor)]
        for params in plan.inputs:
            inputs += [params.integer_value, params.scale, qdq.zero_point_or_new(graph, context.names, params, before=anchor)]
        attributes = [ir.AttrInt64("axis", int(qdq.attribute(node, "axis")))]
        lowered = ir.Node(qdq.MICROSOFT_DOMAIN, "QLinearConcat", inputs, attributes,
                          name=qdq.derived_name(node, "quant"))
        qdq.replace_island(context.model, node, output, lowered, contrib=True)

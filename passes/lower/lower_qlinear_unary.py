"""LowerQLinearUnary: ``DQ(x) → Sigmoid | LeakyRelu → Q(y)`` becomes com.microsoft ``QLinearSigmoid`` /
``QLinearLeakyRelu``.

For a uint8 per-tensor x there are only 256 input codes, so onnxruntime evaluates the float function once per code
into a lookup table:

    table[q] = saturate(round(f((q - zx)·sx) / sy) + zy),   yq = table[xq]

which is ``Q(f(DQ(x)))`` code for code (differences only from float evaluation order, at most one output step).
``LeakyRelu`` keeps its ``alpha``.

Refused (logged): x or y not uint8 per tensor, non-constant params, the float result read by anything but the
one Q.
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

_KERNELS = {"Sigmoid": "QLinearSigmoid", "LeakyRelu": "QLinearLeakyRelu"}


@dataclasses.dataclass(frozen=True)
class _UnaryPlan:
    """An accepted island: the quantization of the input and the Q of the output."""

    node: ir.Node
    params: qdq.QuantParams
    output: qdq.OutputQuantize


@register
class LowerQLinearUnary(RewritePass):
    """Lower QDQ Sigmoid/LeakyRelu islands to com.microsoft QLinearSigmoid/QLinearLeakyRelu."""

    phase = Phase.LOWER
    summary = "DQ → Sigmoid|LeakyRelu → Q becomes QLinearSigmoid/QLinearLeakyRelu"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not qdq.is_op(node, *_KERNELS) or qdq.dequantize_of(node.inputs[0]) is None:
            return None
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> _UnaryPlan | Refusal:
        params = qdq.activation_input(node.inputs[0])
        if isinstance(params, str):
            return Refusal(params)
        output = qdq.output_quantize(node.outputs[0], allow_activation=False)
        if output is None or isinstance(output, str):
            return Refusal(output or f"the {node.op_type} output is read as float (not only by one Q)")
        return _UnaryPlan(node, params, output)

    def rewrite(self, plan: _UnaryPlan, context: RewriteContext) -> None:
        node, params, output = plan.node, plan.params, plan.output
        graph, anchor = node.graph, output.quantize
        inputs = [
            params.integer_value, params.scale, qdq.zero_point_or_new(graph, context.names, params, before=anchor),
            output.params.scale, qdq.zero_point_or_new(graph, context.names, output.params, before=anchor),
        ]
        attributes = []
        if node.op_type == "LeakyRelu":
            attributes.append(ir.AttrFloat32("alpha", float(qdq.attribute(node, "alpha", 0.01))))
        lowered = ir.Node(qdq.MICROSOFT_DOMAIN, _KERNELS[node.op_type], inputs, attributes,
                          name=qdq.derived_name(node, "quant"))
        qdq.replace_island(context.model, node, output, lowered, contrib=True)

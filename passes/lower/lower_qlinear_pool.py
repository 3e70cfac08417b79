"""LowerQLinearPool: ``DQ(x) → GlobalAveragePool | AveragePool → Q(y)`` becomes com.microsoft
``QLinearGlobalAveragePool`` / ``QLinearAveragePool`` (NCHW: ``channels_last = 0``).

An average is linear, so with ``x = (xq - zx)·sx`` (uint8 per tensor) over a window W of |W| elements:

    yq = saturate(round(sx/sy · (Σ_W xq / |W| - zx)) + zy)

which is ``Q(avg(DQ(x)))`` up to float rounding (at most one output step). AveragePool keeps its ``auto_pad``,
``ceil_mode``, ``count_include_pad``, ``kernel_shape``, ``pads`` and ``strides`` (padding counts as zero *real*
value, i.e. ``zx``, exactly like the float pool's zero padding).

Refused (logged): x or y not uint8 per tensor, non-constant params, AveragePool with dilations other than 1 (the
contrib kernel has none), the float result read by anything but the one Q.
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

_KERNELS = {"GlobalAveragePool": "QLinearGlobalAveragePool", "AveragePool": "QLinearAveragePool"}
_AVERAGE_POOL_ATTRIBUTES = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")


@dataclasses.dataclass(frozen=True)
class _PoolPlan:
    """An accepted island: the quantization of the input and the Q of the output."""

    node: ir.Node
    params: qdq.QuantParams
    output: qdq.OutputQuantize


@register
class LowerQLinearPool(RewritePass):
    """Lower QDQ GlobalAveragePool/AveragePool islands to their com.microsoft QLinear kernels."""

    phase = Phase.LOWER
    summary = "DQ → GlobalAveragePool|AveragePool → Q becomes QLinearGlobalAveragePool/QLinearAveragePool"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not qdq.is_op(node, *_KERNELS) or qdq.dequantize_of(node.inputs[0]) is None:
            return None
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> _PoolPlan | Refusal:
        params = qdq.activation_input(node.inputs[0])
        if isinstance(params, str):
            return Refusal(params)
        dilations = qdq.attribute(node, "dilations", None)
        if dilations is not None and any(int(d) != 1 for d in dilations):
            return Refusal(f"dilations {list(dilations)}: QLinearAveragePool has no dilations")
        output = qdq.output_quantize(node.outputs[0], allow_activation=False)
        if output is None or isinstance(output, str):
            return Refusal(output or f"the {node.op_type} output is read as float (not only by one Q)")
        return _PoolPlan(node, params, output)

    def rewrite(self, plan: _PoolPlan, context: RewriteContext) -> None:
        node, params, output = plan.node, plan.params, plan.output
        graph, anchor = node.graph, output.quantize
        inputs = [
            params.integer_value, params.scale, qdq.zero_point_or_new(graph, context.names, params, before=anchor),
            output.params.scale, qdq.zero_point_or_new(graph, context.names, output.params, before=anchor),
        ]
        attributes = [ir.AttrInt64("channels_last", 0)]
        if node.op_type == "AveragePool":
            attributes += [attr for name, attr in node.attributes.items() if name in _AVERAGE_POOL_ATTRIBUTES]
        lowered = ir.Node(qdq.MICROSOFT_DOMAIN, _KERNELS[node.op_type], inputs, attributes,
                          name=qdq.derived_name(node, "quant"))
        qdq.replace_island(context.model, node, output, lowered, contrib=True)

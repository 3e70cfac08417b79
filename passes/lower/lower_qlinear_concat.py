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

from collections.abc import Sequence

import onnx_ir as ir

from qgraph.passes.infrastructure import register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import ContribIslandLowering, IslandPlan


@register
class LowerQLinearConcat(ContribIslandLowering):
    """Lower a QDQ Concat island to com.microsoft QLinearConcat."""

    summary = "DQ… → Concat → Q becomes QLinearConcat"
    kernels = {"Concat": "QLinearConcat"}

    def quantized_inputs(self, node: ir.Node) -> Sequence[ir.Value | None]:
        return node.inputs

    def kernel_inputs(self, plan: IslandPlan, triples: list[list[ir.Value]], output: list[ir.Value]) -> list[ir.Value]:
        """QLinearConcat reads the output's scale and zero point first, then each input's triple."""
        return output + [value for triple in triples for value in triple]

    def kernel_attributes(self, node: ir.Node) -> list[ir.Attr]:
        return [ir.AttrInt64("axis", int(qdq.attribute(node, "axis")))]

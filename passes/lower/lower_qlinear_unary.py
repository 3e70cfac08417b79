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

import onnx_ir as ir

from qgraph.passes.infrastructure import register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import ContribIslandLowering


@register
class LowerQLinearUnary(ContribIslandLowering):
    """Lower QDQ Sigmoid/LeakyRelu islands to com.microsoft QLinearSigmoid/QLinearLeakyRelu."""

    summary = "DQ → Sigmoid|LeakyRelu → Q becomes QLinearSigmoid/QLinearLeakyRelu"
    kernels = {"Sigmoid": "QLinearSigmoid", "LeakyRelu": "QLinearLeakyRelu"}

    def kernel_attributes(self, node: ir.Node) -> list[ir.Attr]:
        if node.op_type == "LeakyRelu":
            return [ir.AttrFloat32("alpha", float(qdq.attribute(node, "alpha", 0.01)))]
        return []

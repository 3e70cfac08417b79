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

from collections.abc import Sequence

import onnx_ir as ir

from qgraph.passes.infrastructure import register
from qgraph.passes.lower._lowering_bases import ContribIslandLowering


@register
class LowerQLinearBinary(ContribIslandLowering):
    """Lower QDQ Add/Mul islands to com.microsoft QLinearAdd/QLinearMul."""

    summary = "DQ, DQ → Add|Mul → [Relu|Clip] → Q becomes QLinearAdd/QLinearMul"
    kernels = {"Add": "QLinearAdd", "Mul": "QLinearMul"}
    allow_activation = True

    def quantized_inputs(self, node: ir.Node) -> Sequence[ir.Value | None]:
        return node.inputs if len(node.inputs) == 2 else ()

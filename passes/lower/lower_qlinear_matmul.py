"""LowerQLinearMatMul: ``DQ(a), DQ(b) → MatMul → [Relu | Clip] → Q(y)`` becomes one ``QLinearMatMul``.

With ``a = (aq - za)·sa`` (uint8, per tensor) and ``b = (bq - zb[n])·sb[n]`` (a constant int8/uint8 weight per
tensor or per output column ``n``, or a uint8 per-tensor activation):

    y[m, n] = sa·sb[n] · Σ_k (aq[m, k] - za)(bq[k, n] - zb[n])
    Q(y)    = saturate(round(sa·sb[n]/sy · acc[m, n]) + zy)

which is ``QLinearMatMul(aq, sa, za, bq, sb, zb, sy, zy)``. onnxruntime 1.19.2's QLinearMatMul accepts a per-column
``b_scale``/``b_zero_point`` of shape ``[N]`` for a 2-D b (verified: identical to the numpy reference above), so
per-channel weights lower directly; per-channel on any other axis or rank is refused.

Relu/Clip before the Q are fused when implied by the output range (see ``_qdq_patterns``). Int8 weights with
``|bq| > 64`` are stored as uint8 (``bq + 128``, ``zb + 128``) so the AVX2 u8·s8 kernel cannot saturate, unless
``guard_saturation=False``.

Refused (logged): a not uint8 per-tensor left operand, non-constant params, int8 or per-channel non-constant right
operand, the float output read by anything but the one Q (LowerIntegerMatMul lowers that case), an activation not
implied by the output range.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.passes.infrastructure import Refusal, RewriteContext, register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import MatMulPlan, WeightLowering


@register
class LowerQLinearMatMul(WeightLowering):
    """Lower a QDQ MatMul island with a quantized output to QLinearMatMul."""

    summary = "DQ → MatMul → [Relu|Clip] → Q becomes QLinearMatMul (per-column weights)"
    op_type = "MatMul"

    def check(self, matmul: ir.Node, context: RewriteContext) -> MatMulPlan | Refusal:
        if not qdq.output_is_quantized_only(matmul.outputs[0]):
            return Refusal("the MatMul output is read as float; LowerIntegerMatMul owns it")
        operands = qdq.matmul_operands(matmul, guard_saturation=self.guard_saturation)
        if isinstance(operands, str):
            return Refusal(operands)
        left, right = operands
        output = qdq.output_quantize(matmul.outputs[0])
        if output is None or isinstance(output, str):
            return Refusal(output or "the MatMul output is not quantized")
        return MatMulPlan(matmul, left, right, output)

    def rewrite(self, plan: MatMulPlan, context: RewriteContext) -> None:
        matmul, output = plan.matmul, plan.output
        graph, anchor = matmul.graph, output.quantize
        right_value, right_zero_point = qdq.operand_values(graph, context.names, plan.right, before=anchor)
        inputs = [
            *qdq.quantized_triple(graph, context.names, plan.left, before=anchor),
            right_value, plan.right.params.scale, right_zero_point,
            *qdq.scale_and_zero_point(graph, context.names, output.params, before=anchor),
        ]
        lowered = ir.Node("", "QLinearMatMul", inputs, name=qdq.derived_name(matmul, "quant"))
        qdq.replace_island(context.model, matmul, output, lowered)

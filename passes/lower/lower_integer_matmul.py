"""LowerIntegerMatMul: ``DQ(a), DQ(b) → MatMul → float y`` (y not quantized) becomes
``MatMulInteger(aq, bq, za, zb) → Cast(float) → Mul(sa·sb)``.

With ``a = (aq - za)·sa`` (uint8 per tensor) and ``b = (bq - zb[n])·sb[n]`` (constant, per tensor or per output
column of a 2-D weight; or a uint8 per-tensor activation):

    y[m, n] = Σ_k a[m, k]·b[k, n] = sa·sb[n] · Σ_k (aq[m, k] - za)(bq[k, n] - zb[n]) = sa·sb[n] · acc[m, n]

``acc`` is exact int32 (onnxruntime 1.19.2's MatMulInteger takes uint8 a with int8 or uint8 b and a per-column b
zero point of shape [N]; verified). The only rounding is the float32 conversion of ``acc`` and the product, so y
matches the QDQ graph to float precision. This is the lowering for a MatMul whose output stays float (for example
the last layer feeding a float graph output); a MatMul whose only reader is a Q is left to LowerQLinearMatMul.

Int8 weights with ``|bq| > 64`` are stored as uint8 (``bq + 128``, ``zb + 128``) to keep the AVX2 u8·s8 kernel
from saturating, unless ``guard_saturation=False``.

Refused (logged): a left operand that is not uint8 per tensor, non-constant params, an int8 or per-channel
non-constant right operand, per-channel weights on another axis or rank.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.passes.infrastructure import Refusal, RewriteContext, register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import MatMulPlan, WeightLowering


@register
class LowerIntegerMatMul(WeightLowering):
    """Lower a QDQ MatMul whose output stays float to MatMulInteger and a float rescale."""

    summary = "DQ → MatMul → float becomes MatMulInteger → Cast → Mul(scale)"
    op_type = "MatMul"
    float_output_only = True

    def check(self, matmul: ir.Node, context: RewriteContext) -> MatMulPlan | Refusal:
        operands = qdq.matmul_operands(matmul, guard_saturation=self.guard_saturation)
        if isinstance(operands, str):
            return Refusal(operands)
        left, right = operands
        return MatMulPlan(matmul, left, right)

    def rewrite(self, plan: MatMulPlan, context: RewriteContext) -> None:
        matmul = plan.matmul
        graph = matmul.graph
        right_value, right_zero_point = qdq.operand_values(graph, context.names, plan.right, before=matmul)
        left_zero_point = plan.left.zero_point
        base = matmul.name or "matmul"
        integer = ir.Node(
            "", "MatMulInteger", [plan.left.integer_value, right_value, left_zero_point, right_zero_point],
            name=f"{base}_integer",
        )
        scale = np.float64(plan.left.scalar_scale()) * plan.right.params.scale_array.astype(np.float64)
        scale = scale.reshape(-1) if not plan.right.params.per_tensor else scale.reshape(())
        nodes = [
            integer,
            *qdq.rescale_nodes(graph, context.names, integer.outputs[0], scale, None, before=matmul, base_name=base),
        ]
        qdq.replace_float_op(matmul, nodes)

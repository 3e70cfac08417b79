"""LowerMatMulIntegerToFloat: ``DQ(a), DQ(W) → MatMul → [Add(·, b)] → float`` becomes one
``com.microsoft::MatMulIntegerToFloat``.

With ``a = (a_q − z_a)·s_a`` (uint8, per tensor) and a constant weight ``W = (W_q − z_w[n])·s_w[n]`` (int8 or uint8,
per tensor or per output column of a 2-D weight)::

    y[m, n] = s_a·s_w[n] · Σ_k (a_q[m, k] − z_a)(W_q[k, n] − z_w[n])  +  b[n]

which is ``MatMulIntegerToFloat(a_q, W_q, s_a, s_w, z_a, z_w, b)`` (onnxruntime contrib operator, com.microsoft
opset 1; ``b`` optional). It is the transformer's projection ``x·W + b`` whose output is read as float (a bias Add, a
Reshape into heads, GELU, a residual Add): one kernel instead of MatMulInteger → Cast → Mul → Add, and the bias Add
that alone reads the MatMul output with a constant ``[N]`` operand (either order) is absorbed. The integer
accumulator is exact; only the float conversion and the rescale round, as in :mod:`.lower_integer_matmul`, which
keeps the cases this pass refuses (an activation as the right operand).

Int8 weights with ``|W_q| > 64`` are stored as uint8 (``W_q + 128``, ``z_w + 128``) unless
``guard_saturation=False`` (see :mod:`._qdq_patterns`).

Refused (logged): a left operand that is not uint8 per tensor, a right operand that is not a constant weight,
per-channel weights on another axis or rank, an output read only by a QuantizeLinear (LowerQLinearMatMul's).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.passes.infrastructure import Refusal, RewriteContext, register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import WeightLowering

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Plan:
    matmul: ir.Node
    left: qdq.QuantParams
    right: qdq.MatMulOperand
    #: The bias Add absorbed and the index of its constant operand, or None.
    add: ir.Node | None
    bias_index: int | None


def _bias_add(matmul: ir.Node, columns: int) -> tuple[ir.Node, int] | None:
    add = qdq.sole_consumer(matmul.outputs[0])
    if not qdq.is_op(add, "Add"):
        return None
    for index in (0, 1):
        if add.inputs[1 - index] is matmul.outputs[0]:
            bias = qdq.constant_array(add.inputs[index])
            if bias is not None and bias.dtype == np.float32 and bias.shape == (columns,):
                return add, index
    return None


@register
class LowerMatMulIntegerToFloat(WeightLowering):
    """Lower a QDQ MatMul with a constant weight and a float output (plus its bias Add) to MatMulIntegerToFloat."""

    summary = "DQ → MatMul(constant W) → [Add bias] → float becomes com.microsoft MatMulIntegerToFloat"
    op_type = "MatMul"
    float_output_only = True  # an output read only by Q is LowerQLinearMatMul's pattern

    def check(self, matmul: ir.Node, context: RewriteContext) -> _Plan | Refusal:
        operands = qdq.matmul_operands(matmul, guard_saturation=self.guard_saturation)
        if isinstance(operands, str):
            return Refusal(operands)
        left, right = operands
        if right.weight is None:
            return Refusal("the right operand is an activation; LowerIntegerMatMul owns it")
        columns = right.weight.weight.shape[-1]
        found = _bias_add(matmul, columns)
        return _Plan(matmul, left, right, *(found if found else (None, None)))

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        matmul = plan.matmul
        graph = matmul.graph
        right_value, right_zero_point = qdq.operand_values(graph, context.names, plan.right, before=matmul)
        inputs = [plan.left.integer_value, right_value, plan.left.scale, plan.right.params.scale,
                  qdq.zero_point_or_new(graph, context.names, plan.left, before=matmul), right_zero_point]
        if plan.add is not None:
            inputs.append(plan.add.inputs[plan.bias_index])
        lowered = ir.Node(qdq.MICROSOFT_DOMAIN, "MatMulIntegerToFloat", inputs,
                          name=qdq.derived_name(matmul, "integer_to_float"))
        graph.insert_before(matmul, lowered)
        replaced = plan.add if plan.add is not None else matmul
        qdq.take_over(replaced.outputs[0], lowered.outputs[0])
        qdq.ensure_microsoft_domain(context.model)
        qdq.remove_if_unused([plan.add, matmul, *[qdq.dequantize_of(value) for value in matmul.inputs]])

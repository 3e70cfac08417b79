"""LowerQGemm: ``DQ(a), DQ(Bq), [DQ(cq)] → Gemm → [Relu | Clip → ] [Q(y)]`` becomes com.microsoft ``QGemm``.

Gemm computes ``y = alpha · A'·B' + beta · C`` (``A' = Aᵀ`` if transA, ``B' = Bᵀ`` if transB). With
``A = (Aq - za)·sa`` (uint8 per tensor) and ``B = (Bq - zb[n])·sb[n]`` (constant, per tensor or per output column
``n``: axis 1 of B when transB=0, axis 0 when transB=1), onnxruntime 1.19.2's QGemm computes (verified against
numpy for alpha 1 and 2, C of shape [N], [1, N] and [M, N], per-column B scale, transB 0 and 1)

    acc[m, n] = Σ_k (A'q[m, k] - za)(B'q[k, n] - zb[n]) + Cq[m, n]
    y[m, n]   = alpha·sa·sb[n] · acc[m, n]                      (float output: no y_scale)
    yq[m, n]  = saturate(round(alpha·sa·sb[n]/sy · acc[m, n]) + zy)   (quantized output)

so the bias goes in as ``Cq = round(beta · C / (alpha·sa·sb[n]))`` (int32). When alpha = beta = 1 and C is the
contract's ``DQ(bq)`` with scale ``sa·sb`` and zero point 0, ``bq`` is used unchanged (exact); otherwise C is
requantized, an error of at most half an accumulator step. The quantized form fuses a Relu/Clip implied by the
output range; the float form (output read as float, e.g. the classifier feeding a float graph output) matches the
QDQ graph to float precision.

Int8 weights with ``|Bq| > 64`` are stored as uint8 (``Bq + 128``, ``zb + 128``) so the AVX2 u8·s8 kernel cannot
saturate, unless ``guard_saturation=False``.

Refused (logged): A not uint8 per tensor, non-constant B/params/C, per-channel B on the reduction axis, a C shape
QGemm does not take (only scalar, [N], [1, N], [M, N]), a C that does not fit int32, an output quantized to
something other than uint8 per tensor, an activation between Gemm and Q that the output range does not imply.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.passes.infrastructure import Refusal, RewriteContext, register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import WeightLowering


@dataclasses.dataclass(frozen=True)
class _GemmPlan:
    """An accepted Gemm: A's and B's quantization, the kernel's B, C in int32 (``bias_unchanged``: the stored int32
    tensor as it is) and the Q of the output (``None``: the output stays float)."""

    gemm: ir.Node
    left: qdq.QuantParams
    right: qdq.QuantParams
    weight: qdq.KernelWeight
    bias: np.ndarray | None
    bias_unchanged: bool
    output: qdq.OutputQuantize | None


@register
class LowerQGemm(WeightLowering):
    """Lower a QDQ Gemm (quantized or float output) to com.microsoft QGemm."""

    summary = "DQ → Gemm → [Q] becomes com.microsoft QGemm (per-column B, int32 C, float or uint8 output)"
    op_type = "Gemm"

    def check(self, gemm: ir.Node, context: RewriteContext) -> _GemmPlan | Refusal:
        left = qdq.activation_input(gemm.inputs[0])
        if isinstance(left, str):
            return Refusal(left)
        right = qdq.read_params(qdq.dequantize_of(gemm.inputs[1]))
        if isinstance(right, str):
            return Refusal(right)
        weight_array = qdq.constant_array(right.integer_value)
        if weight_array is None or weight_array.ndim != 2:
            return Refusal("B is not a constant 2-D initializer")
        transpose_b = int(qdq.attribute(gemm, "transB", 0))
        output_axis = 0 if transpose_b else 1
        columns = weight_array.shape[output_axis]
        if not right.per_tensor and right.axis % 2 != output_axis:
            return Refusal(f"B is quantized per channel along axis {right.axis}, not its output axis {output_axis}")
        weight = qdq.kernel_weight(right, guard_saturation=self.guard_saturation)
        if isinstance(weight, str):
            return Refusal(weight)
        bias, bias_unchanged = None, False
        if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
            stored = self._bias(gemm, left, right, columns)
            if isinstance(stored, str):
                return Refusal(stored)
            bias, bias_unchanged = stored
        output = None
        if qdq.output_is_quantized_only(gemm.outputs[0]):
            output = qdq.output_quantize(gemm.outputs[0])
            if output is None or isinstance(output, str):
                return Refusal(output or "the Gemm output is not quantized")
        return _GemmPlan(gemm, left, right, weight, bias, bias_unchanged, output)

    @staticmethod
    def _bias(gemm: ir.Node, left: qdq.QuantParams, right: qdq.QuantParams, columns: int):
        alpha = float(qdq.attribute(gemm, "alpha", 1.0))
        beta = float(qdq.attribute(gemm, "beta", 1.0))
        accumulator_scale = np.broadcast_to(
            alpha * left.scalar_scale() * right.scale_array.astype(np.float64).reshape(-1), (columns,)
        )
        if alpha == 1.0 and beta == 1.0:
            stored = qdq.bias_as_int32(gemm.inputs[2], accumulator_scale)
            if not isinstance(stored, str):
                return stored
        real = qdq.constant_float(gemm.inputs[2])
        if isinstance(real, str):
            return f"C: {real}"
        if real.size == 1:
            real = np.broadcast_to(real.reshape(-1), (columns,))
        if real.ndim > 2 or real.shape[-1] != columns:
            return f"C has shape {real.shape}; QGemm takes a scalar, [N], [1, N] or [M, N] bias (N = {columns})"
        quantized = qdq.int32_or_none(beta * real.astype(np.float64) / accumulator_scale)
        if quantized is None:
            return "C does not fit int32 in the accumulator scale alpha·sa·sb"
        return quantized, False

    def rewrite(self, plan: _GemmPlan, context: RewriteContext) -> None:
        gemm, output = plan.gemm, plan.output
        graph = gemm.graph
        anchor = output.quantize if output is not None else gemm
        operand = qdq.MatMulOperand(plan.right, plan.weight)
        right_value, right_zero_point = qdq.operand_values(graph, context.names, operand, before=anchor)
        inputs = [
            *qdq.quantized_triple(graph, context.names, plan.left, before=anchor),
            right_value, plan.right.scale, right_zero_point,
        ]
        if plan.bias is not None:
            if plan.bias_unchanged:
                inputs.append(qdq.dequantize_of(gemm.inputs[2]).inputs[0])
            else:
                inputs.append(qdq.add_constant(
                    graph, context.names, f"{gemm.name or 'gemm'}_bias_int32", plan.bias, before=anchor
                ))
        else:
            inputs.append(None)
        if output is not None:
            inputs += [output.params.scale, qdq.zero_point_or_new(graph, context.names, output.params, before=anchor)]
        else:
            while inputs and inputs[-1] is None:
                inputs.pop()
        attributes = [
            ir.AttrFloat32("alpha", float(qdq.attribute(gemm, "alpha", 1.0))),
            ir.AttrInt64("transA", int(qdq.attribute(gemm, "transA", 0))),
            ir.AttrInt64("transB", int(qdq.attribute(gemm, "transB", 0))),
        ]
        lowered = ir.Node(qdq.MICROSOFT_DOMAIN, "QGemm", inputs, attributes, name=qdq.derived_name(gemm, "quant"))
        if output is not None:
            qdq.replace_island(context.model, gemm, output, lowered, contrib=True)
        else:
            qdq.ensure_microsoft_domain(context.model, graph)
            lowered.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            qdq.replace_float_op(gemm, [lowered])

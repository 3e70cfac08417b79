"""LowerFourBitMatMul: a MatMul/Gemm over a 4-bit weight (int8 codes in [-8, 7]) becomes packed ``MatMulNBits``.

With ``--weight-bits 4`` and static activations, quantization writes ``MatMul(DQ(x_q), DQ(q, s; axis = 1))`` with
``q ∈ [-7, 7]`` one per int8 byte. onnxruntime has no integer kernel that reads int4 (QLinearMatMul, MatMulInteger
and QLinearConv refuse the type; see ``docs/runtime-facts.md``), so the QOperator choices for such a MatMul are the
int8 kernels on widened codes (as large as INT8), int4 storage with a DequantizeLinear before a float MatMul, or
``com.microsoft.MatMulNBits``, which reads packed 4-bit codes and multiplies float activations. Measured (same
document) MatMulNBits is the smallest and, at batch 1 where a MatMul is bound by reading its weight, the fastest;
this pass writes it:

    MatMul(x, DQ(q, s; axis=1))           →  MatMulNBits(x, pack(q + 8), ŝ; K, N, bits=4, block_size=B)
    Gemm(x, DQ(q, s), c; transB)          →  Add(MatMulNBits(x, ...), c)            (alpha = beta = 1, no transA)

``x`` stays what it was (in a static QDQ graph the DequantizeLinear of the uint8 activation, which the lowering
keeps, and the QuantizeLinear after the MatMul stays too). MatMulNBits computes ``y[m, n] = Σ_k x[m, k] ·
ŝ[⌊k/B⌋, n] · (c[k, n] − 8)`` with ``c = q + 8`` (no zero-point input: onnxruntime's default 8); the per-column
scale ``s[n]`` is repeated over the blocks, ``ŝ[j, n] = s[n]`` (a per-tensor scale over every column), so the
weight is exactly ``s[n] · q[k, n]``, the DequantizeLinear's, and the lowering changes no value beyond float
summation order with ``accuracy_level`` 0 (float arithmetic); ``accuracy_level = 4`` (onnxruntime quantizes x to
int8 per block, 2-3x faster) moves 15-20% of the outputs by one quantization step on Gaussian inputs (rarely two
after a ReLU, whose outputs use half of int8's codes). B is ``block_size`` (128), or the smallest power of two
≥ K when K is smaller (at least 16); a K that is not a multiple of B is padded with code 8, i.e. with zeros (see
:mod:`qgraph.quant.blockwise`). The int32 bias of a Gemm stays behind its DequantizeLinear and is added in float.

Refused (logged): codes beyond [-8, 7] (an 8-bit weight: the integer lowerings take it), a non-zero zero point, a
weight that is not a 2-D constant or is quantized along its input axis, a Gemm with transA, alpha or beta, an input
that is not float32.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer, take_over
from qgraph.ir.values import constant_array, ensure_microsoft_domain, is_constant, is_op
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.quant.blockwise import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, BlockQuantizedWeight, BlockSpec, pack_matmul_nbits

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 128
#: MatMulNBits ``accuracy_level``: 0 multiplies in float32 (the DequantizeLinear's values exactly); 4 lets onnxruntime
#: quantize x to int8 per block for its VNNI kernels (faster; moves some outputs by a quantization step).
ACCURACY_LEVELS = (0, 4)
FOUR_BIT_RANGE = (-8, 7)


@dataclasses.dataclass(frozen=True)
class _Match:
    node: ir.Node
    dequantize: ir.Node


@dataclasses.dataclass(frozen=True)
class _Plan:
    node: ir.Node
    dequantize: ir.Node
    weight: BlockQuantizedWeight
    bias: ir.Value | None


def block_size_for(rows: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """``block_size``, or the smallest power of two ≥ ``rows`` (at least 16) when the weight has fewer rows."""
    fitting = max(MIN_BLOCK_SIZE, 1 << max(rows - 1, 0).bit_length())
    return min(block_size, fitting, MAX_BLOCK_SIZE)


@register
class LowerFourBitMatMul(RewritePass):
    """Lower MatMul/Gemm over a per-channel 4-bit weight (int8 codes in [-8, 7]) to packed MatMulNBits."""

    phase = Phase.LOWER
    summary = "MatMul/Gemm over a 4-bit per-channel DQ weight becomes com.microsoft MatMulNBits (packed, exact)"

    def __init__(self, *, block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = 0) -> None:
        super().__init__()
        if accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
        self.block_size = block_size
        self.accuracy_level = accuracy_level

    def match(self, node: ir.Node, context: RewriteContext) -> _Match | None:
        if not is_op(node, "MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
            return None
        producer = node.inputs[1].producer()
        if producer is None or not is_op(producer, "DequantizeLinear"):
            return None
        codes = producer.inputs[0]
        if not is_constant(codes) or codes.dtype != ir.DataType.INT8:
            return None
        return _Match(node, producer)

    def check(self, match: _Match, context: RewriteContext) -> _Plan | Refusal:
        node, dequantize = match.node, match.dequantize
        codes = constant_array(dequantize.inputs[0])
        scale = constant_array(dequantize.inputs[1]) if dequantize.inputs[1] is not None else None
        zero_value = dequantize.inputs[2] if len(dequantize.inputs) > 2 else None
        zero = constant_array(zero_value) if zero_value is not None else np.zeros((), np.int8)
        if codes is None or scale is None or zero is None:
            return Refusal("the weight's DequantizeLinear inputs are not all constants")
        if codes.ndim != 2:
            return Refusal(f"the weight has rank {codes.ndim}; MatMulNBits takes a 2-D weight")
        if codes.size and (codes.min() < FOUR_BIT_RANGE[0] or codes.max() > FOUR_BIT_RANGE[1]):
            return Refusal(f"codes span [{codes.min()}, {codes.max()}], beyond 4 bits (an 8-bit weight)")
        if np.any(zero != 0):
            return Refusal("the weight has a non-zero zero point")
        transposed = False
        bias = None
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0 \
                    or node.attributes.get_float("beta", 1.0) != 1.0:
                return Refusal("a Gemm with transA, alpha or beta other than the defaults")
            transposed = bool(node.attributes.get_int("transB", 0))
            bias = node.inputs[2] if len(node.inputs) > 2 else None
        if node.inputs[0] is None or node.inputs[0].dtype not in (None, ir.DataType.FLOAT):
            return Refusal("MatMulNBits is lowered for float32 activations")
        output_axis = 0 if transposed else 1
        axis = dequantize.attributes.get_int("axis", 1)
        if scale.size > 1 and (axis % 2 != output_axis or scale.ndim != 1):
            return Refusal(f"the weight is quantized along axis {axis}, not per output channel")
        if dequantize.attributes.get_int("block_size", 0):
            return Refusal("the weight's DequantizeLinear is blocked (LowerMatMulNBits lowers that form)")
        matrix = codes.T if transposed else codes  # [K, N]
        rows, columns = matrix.shape
        block = block_size_for(rows, self.block_size)
        count = -(-rows // block)
        column_scales = np.broadcast_to(scale.astype(np.float32).reshape(-1), (columns,))
        scales = np.ascontiguousarray(np.broadcast_to(column_scales, (count, columns)), np.float32)
        weight = BlockQuantizedWeight(np.ascontiguousarray(matrix, np.int32), scales, None, BlockSpec(4, block, True))
        return _Plan(node, dequantize, weight, bias)

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        node, graph = plan.node, plan.node.graph
        packed, scales, _ = pack_matmul_nbits(plan.weight)
        base = plan.dequantize.inputs[0].name or node.name or "weight"
        rows, columns = plan.weight.shape
        nbits = ir.Node(
            "com.microsoft", "MatMulNBits",
            [node.inputs[0], new_initializer(graph, context.names, f"{base}_nbits", packed),
             new_initializer(graph, context.names, f"{base}_nbits_scales", scales)],
            [ir.AttrInt64("K", rows), ir.AttrInt64("N", columns), ir.AttrInt64("bits", 4),
             ir.AttrInt64("block_size", plan.weight.spec.block_size),
             *([ir.AttrInt64("accuracy_level", self.accuracy_level)] if self.accuracy_level else [])],
            name=context.names.fresh(f"{node.name or 'matmul'}_nbits"))
        new_nodes = [nbits]
        result = nbits.outputs[0]
        if plan.bias is not None:
            nbits.outputs[0].name = context.names.fresh(f"{node.name or 'gemm'}_product")
            add = ir.Node("", "Add", [nbits.outputs[0], plan.bias], name=context.names.fresh(f"{node.name}_bias"))
            new_nodes.append(add)
            result = add.outputs[0]
        graph.insert_before(node, new_nodes)
        ensure_microsoft_domain(context.model, graph if graph is not context.model.graph else None)
        take_over(node.outputs[0], result, context.names)
        graph.remove(node, safe=True)
        dequantize_inputs = list(plan.dequantize.inputs)
        if not plan.dequantize.outputs[0].uses():
            graph.remove(plan.dequantize, safe=True)
            drop_unused_initializers(dequantize_inputs)
        logger.debug("%s: 4-bit %s lowered to MatMulNBits (K=%d, N=%d, block %d)", node.name, node.op_type, rows,
                     columns, plan.weight.spec.block_size)

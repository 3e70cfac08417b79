"""LowerMatMulNBits: ``MatMul(x, DQ(q4, s[, z]; axis=0, block_size=B))`` becomes ``com.microsoft.MatMulNBits``.

onnxruntime's MatMulNBits computes ``y = x · Ŵ`` with ``Ŵ[k, n] = s[⌊k/B⌋, n] · (q[k, n] − z[⌊k/B⌋, n])`` straight
from packed 4-bit codes, the same weight the blocked DequantizeLinear produces, so the lowering changes no value
beyond float summation order. Its inputs (see :mod:`qgraph.quant.blockwise` for the layout): ``B [N, n_blocks,
B/2]`` uint8 with two codes per byte (even k in the low nibble), ``scales [N · n_blocks]``, ``zero_points
[N · ceil(n_blocks / 2)]`` packed uint8; attributes ``K``, ``N``, ``bits = 4``, ``block_size`` and
``accuracy_level`` (0 leaves it unset; 4 lets onnxruntime quantize x to int8 for its VNNI kernels). Int4 codes
``q`` (symmetric, z = 0) are stored as ``q + 8`` with no zero-point input (onnxruntime's default z = 8); uint4
codes keep their zero points. A K that is not a multiple of B is padded to whole blocks with the zero point, whose
weights are exactly 0 (MatMulNBits pads x the same way).

Refused (logged): a weight that is not int4/uint4 (onnxruntime 1.19's CPU MatMulNBits runs 4 bits only; 8-bit
weights stay DequantizeLinear → MatMul), a DequantizeLinear that is not blocked on axis 0 of a 2-D constant, a
block size that is not a power of two of at least 16, a float input that is not float32.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer, take_over
from qgraph.ir.values import constant_array, ensure_microsoft_domain, is_op
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.quant.blockwise import BlockQuantizedWeight, BlockSpec, pack_matmul_nbits

logger = logging.getLogger(__name__)

_FOUR_BIT = {ir.DataType.INT4: True, ir.DataType.UINT4: False}  # -> symmetric


@dataclasses.dataclass(frozen=True)
class _Plan:
    matmul: ir.Node
    dequantize: ir.Node
    weight: BlockQuantizedWeight


@register
class LowerMatMulNBits(RewritePass):
    """Lower a MatMul over a blocked int4/uint4 DequantizeLinear weight to packed MatMulNBits."""

    phase = Phase.LOWER
    summary = "MatMul(x, blocked int4 DQ) becomes com.microsoft MatMulNBits (packed 4-bit weights)"

    def __init__(self, *, accuracy_level: int = 0) -> None:
        super().__init__()
        self.accuracy_level = accuracy_level

    def match(self, node: ir.Node, context: RewriteContext) -> _Plan | None:
        if not is_op(node, "MatMul") or node.inputs[1] is None:
            return None
        producer = node.inputs[1].producer()
        if producer is None or not is_op(producer, "DequantizeLinear"):
            return None
        return _Plan(node, producer, None)  # type: ignore[arg-type]

    def check(self, plan: _Plan, context: RewriteContext) -> _Plan | Refusal:
        dequantize = plan.dequantize
        codes_value = dequantize.inputs[0]
        if codes_value is None or codes_value.dtype not in _FOUR_BIT:
            dtype = None if codes_value is None else codes_value.dtype
            return Refusal(f"weight codes of type {dtype}: onnxruntime 1.19's CPU MatMulNBits runs 4-bit weights only")
        arrays = [constant_array(value) if value is not None else None for value in dequantize.inputs]
        if arrays[0] is None or arrays[1] is None or (len(arrays) > 2 and dequantize.inputs[2] is not None
                                                      and arrays[2] is None):
            return Refusal("the DequantizeLinear inputs are not all constants")
        axis = dequantize.attributes.get("axis")
        block = dequantize.attributes.get("block_size")
        block_size = block.value if block is not None else 0
        if (axis.value if axis is not None else 1) != 0 or arrays[0].ndim != 2:
            return Refusal("the DequantizeLinear is not blocked along axis 0 of a 2-D weight")
        if block_size < 16 or block_size & (block_size - 1):
            return Refusal(f"block size {block_size} is not a power of two of at least 16")
        if plan.matmul.inputs[0] is None or plan.matmul.inputs[0].dtype not in (None, ir.DataType.FLOAT):
            return Refusal("MatMulNBits is lowered for float32 activations")
        symmetric = _FOUR_BIT[codes_value.dtype]
        codes = arrays[0].astype(np.int32)
        scales = arrays[1].astype(np.float32)
        zero = None
        if len(arrays) > 2 and arrays[2] is not None:
            zero = arrays[2].astype(np.int32)
        if symmetric and zero is not None and np.any(zero != 0):
            return Refusal("int4 codes with non-zero zero points")
        if symmetric:
            zero = None
        elif zero is None:
            zero = np.zeros(scales.shape, np.int32)
        if scales.shape != (-(-codes.shape[0] // block_size), codes.shape[1]):
            return Refusal(f"scales of shape {scales.shape} do not match {codes.shape} in blocks of {block_size}")
        weight = BlockQuantizedWeight(codes, scales, zero, BlockSpec(4, block_size, symmetric))
        return _Plan(plan.matmul, dequantize, weight)

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        matmul, graph = plan.matmul, plan.matmul.graph
        packed, scales, zero = pack_matmul_nbits(plan.weight)
        base = plan.dequantize.inputs[0].name or matmul.name or "weight"
        inputs = [matmul.inputs[0], new_initializer(graph, context.names, f"{base}_packed", packed),
                  new_initializer(graph, context.names, f"{base}_packed_scales", scales)]
        if zero is not None:
            inputs.append(new_initializer(graph, context.names, f"{base}_packed_zero_points", zero))
        rows, columns = plan.weight.shape
        attributes = [ir.AttrInt64("K", rows), ir.AttrInt64("N", columns), ir.AttrInt64("bits", 4),
                      ir.AttrInt64("block_size", plan.weight.spec.block_size)]
        if self.accuracy_level:
            attributes.append(ir.AttrInt64("accuracy_level", self.accuracy_level))
        nbits = ir.Node("com.microsoft", "MatMulNBits", inputs, attributes, name=matmul.name)
        graph.insert_before(matmul, [nbits])
        ensure_microsoft_domain(context.model, graph if graph is not context.model.graph else None)
        take_over(matmul.outputs[0], nbits.outputs[0], context.names)
        graph.remove(matmul, safe=True)
        dequantize_inputs = list(plan.dequantize.inputs)
        if not plan.dequantize.outputs[0].uses():
            graph.remove(plan.dequantize, safe=True)
            drop_unused_initializers(dequantize_inputs)
        logger.debug("%s: lowered to MatMulNBits (K=%d, N=%d, block %d)", matmul.name, rows, columns,
                     plan.weight.spec.block_size)

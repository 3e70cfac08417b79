"""QuantizeWeightsBlockwise: weight-only quantization, written as blocked ``DequantizeLinear`` (opset 21).

For each node named in ``weights`` (a :class:`~qgraph.quant.blockwise.BlockQuantizedWeight` computed by RTN, GPTQ
or AWQ, see :mod:`qgraph.weight_only`), the constant weight is replaced by its codes and a DequantizeLinear:

    MatMul(x, W)             →  MatMul(x, DQ(q, s[, z]; axis=0, block_size=B))
    Gemm(x, W, c; transB)    →  Add(MatMul(x, DQ(q, s[, z]; axis=0, block_size=B)), c)     (alpha = beta = 1)
    Gather(E, ids)           →  Gather(DQ(qᵀ, sᵀ[, zᵀ]; axis=1, block_size=B), ids)          (embeddings)

with ``DQ(q, s, z)[k, n] = s[⌊k/B⌋, n] · (q[k, n] − z[⌊k/B⌋, n])`` (the last block may be partial). The weight is
always given in MatMul orientation ``[K, N]``: a Gemm with ``transB = 1`` reads ``Wᵀ`` and an embedding table
``E [V, H]`` is quantized as ``Eᵀ [H, V]`` (blocks along the hidden axis, one row of scales per token), stored
back as ``[V, H]`` codes with ``axis = 1``. Codes are int4 (symmetric) or uint4 with uint4 zero points (int8 /
uint8 for 8 bits), so the file holds half a byte per 4-bit weight; activations stay float.

The numerics are exactly the quantized weight's (``DQ`` reproduces :meth:`BlockQuantizedWeight.dequantize`). The
pass is idempotent: a weight already behind a DequantizeLinear is no constant any more and is not matched.

Refused (logged): a model below opset 21 (blocked DequantizeLinear and int4 are opset-21 features), a weight that
is not a constant or whose shape is not the quantized weight's, a Gemm with ``transA``, ``alpha ≠ 1`` or
``beta ≠ 1``, a Gather on another axis.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer, take_over
from qgraph.ir.values import constant_array, constant_refusal, default_opset, is_op
from qgraph.passes.infrastructure import Phase, QGraphPass, Refusal, RewriteContext, RewritePass, register
from qgraph.quant.blockwise import BlockQuantizedWeight

logger = logging.getLogger(__name__)

MINIMUM_OPSET = 21
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}


@dataclasses.dataclass(frozen=True)
class _Plan:
    node: ir.Node
    weight: BlockQuantizedWeight
    #: Codes/scales/zero points as stored, and the DequantizeLinear axis.
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    axis: int


def _storage_type(weight: BlockQuantizedWeight):
    if weight.spec.bits == 4:
        return ml_dtypes.int4 if weight.spec.symmetric else ml_dtypes.uint4
    return np.int8 if weight.spec.symmetric else np.uint8


@register
class QuantizeWeightsBlockwise(QGraphPass):
    """Replace the constant weights of the named MatMul/Gemm/Gather nodes by blocked int4/int8 DequantizeLinear."""

    phase = Phase.QUANTIZE
    summary = "constant weights of MatMul/Gemm/Gather become blocked int4 (or int8) codes behind DequantizeLinear"

    #: Driven by the data given at construction (as InsertQuantizeDequantize is by its plan), so not a RewritePass
    #: of the registry's no-argument protocol; it runs the same match / check / rewrite loop.
    call = RewritePass.call

    def __init__(self, *, weights: Mapping[str, BlockQuantizedWeight]) -> None:
        super().__init__()
        self.weights = dict(weights)

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if node.name not in self.weights or not is_op(node, *WEIGHT_INPUT):
            return None
        weight = node.inputs[WEIGHT_INPUT[node.op_type]]
        if weight is not None and weight.producer() is not None and is_op(weight.producer(), "DequantizeLinear"):
            return None  # already quantized
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> _Plan | Refusal:
        if default_opset(context.model) < MINIMUM_OPSET:
            return Refusal(f"blocked DequantizeLinear needs opset {MINIMUM_OPSET}, the model has "
                           f"{default_opset(context.model)}")
        weight_value = node.inputs[WEIGHT_INPUT[node.op_type]]
        refusal = constant_refusal(weight_value, f"the {node.op_type} weight")
        if refusal:
            return Refusal(refusal)
        array = constant_array(weight_value)
        quantized = self.weights[node.name]
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0 \
                    or node.attributes.get_float("beta", 1.0) != 1.0:
                return Refusal("a Gemm with transA, alpha or beta other than the defaults")
            if node.attributes.get_int("transB", 0):
                array = array.T
        elif node.op_type == "Gather":
            if node.attributes.get_int("axis", 0) != 0:
                return Refusal("a Gather on an axis other than 0 reads no embedding rows")
            array = array.T
        if array.ndim != 2 or tuple(array.shape) != tuple(quantized.shape):
            return Refusal(f"the weight's shape {array.shape} is not the quantized weight's {quantized.shape}")
        storage = _storage_type(quantized)
        codes, scales, zero = quantized.codes, quantized.scales, quantized.zero_points
        axis = 0
        if node.op_type == "Gather":
            codes, scales = codes.T, scales.T
            zero = zero.T if zero is not None else None
            axis = 1
        return _Plan(node, quantized, np.ascontiguousarray(codes).astype(storage), np.ascontiguousarray(scales),
                     None if zero is None else np.ascontiguousarray(zero).astype(storage), axis)

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        node, graph = plan.node, plan.node.graph
        index = WEIGHT_INPUT[node.op_type]
        old_weight = node.inputs[index]
        base = old_weight.name or node.name or "weight"
        inputs = [new_initializer(graph, context.names, f"{base}_q{plan.weight.spec.bits}", plan.codes),
                  new_initializer(graph, context.names, f"{base}_scales", plan.scales.astype(np.float32))]
        if plan.zero_points is not None:
            inputs.append(new_initializer(graph, context.names, f"{base}_zero_points", plan.zero_points))
        dequantize = ir.Node("", "DequantizeLinear", inputs,
                             [ir.AttrInt64("axis", plan.axis), ir.AttrInt64("block_size", plan.weight.spec.block_size)],
                             name=context.names.fresh(f"{node.name}_weight_dequantize"))
        dequantize.outputs[0].name = context.names.fresh(f"{base}_dequantized")
        dequantize.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dequantize.outputs[0].shape = ir.Shape(plan.codes.shape)
        graph.insert_before(node, [dequantize])
        if node.op_type == "Gemm":
            matmul = ir.Node("", "MatMul", [node.inputs[0], dequantize.outputs[0]], name=node.name)
            new_nodes = [matmul]
            output = matmul.outputs[0]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                add = ir.Node(
                    "", "Add", [matmul.outputs[0], node.inputs[2]], name=context.names.fresh(f"{node.name}_bias")
                )
                new_nodes.append(add)
                output = add.outputs[0]
            matmul.outputs[0].name = context.names.fresh(f"{node.name}_matmul")
            graph.insert_before(node, new_nodes)
            take_over(node.outputs[0], output, context.names)
            graph.remove(node, safe=True)
        else:
            node.replace_input_with(index, dequantize.outputs[0])
        drop_unused_initializers([old_weight])
        logger.debug("%s: %s weight quantized to %d bits in blocks of %d", node.name, node.op_type,
                     plan.weight.spec.bits, plan.weight.spec.block_size)

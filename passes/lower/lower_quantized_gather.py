"""LowerQuantizedGather: an embedding lookup in a quantized table reads the integer rows and dequantizes only them.

The QDQ graph stores an embedding table ``E`` (``[rows, columns]``) as integer codes ``q`` behind a
DequantizeLinear, per row ``v`` (axis 0, what qgraph writes), per column ``j`` (axis 1) or per tensor, and a Gather
on axis 0 looks up the rows of the dequantized table. Selecting rows commutes with the dequantization once the
parameters are selected with them::

    per row:     Gather(DQ(q; s, z, axis=0), ids)[i…, j] = (q[ids[i…], j] − z[ids[i…]]) · s[ids[i…]]
    per column:  Gather(DQ(q; s, z, axis=1), ids)[i…, j] = (q[ids[i…], j] − z_j) · s_j

so the lowering looks up the codes, ``rows = Gather(q, ids)``, and scales them: per row by the looked-up scales,
``Mul(Cast(rows), Unsqueeze(Gather(s, ids), −1))``; per column by ``s`` on the last axis, ``Mul(Cast(rows), s)``;
per tensor one ``DequantizeLinear(rows, s, z)``. A zero point that is not 0 is subtracted before the scale (looked
up too, per row). ``float(q − z) = float(q) − float(z)`` for 8-bit codes and the one multiplication is the same, so
the values are bit for bit those of the QDQ graph.

Why: onnxruntime does not fold a DequantizeLinear of a constant when it optimises a graph (it keeps them for its
QDQ fusions), so ``Gather(DQ(q), ids)`` dequantizes the whole table on every run: 46 ms for a BERT-base word
embedding (30522 × 768) at batch 1, sequence 128, against 0.09 ms for ``DQ(Gather(q, ids))`` (onnxruntime 1.19.2,
2 threads). The lowered form is explicit QDQ as well, so both ort-cpu formats run it. Cast + Mul rather than one
DequantizeLinear on an axis: onnxruntime 1.19.2's per-axis DequantizeLinear takes one element at a time when the
axis is the innermost one, 1.38 ms for 8 × 128 × 768 values against 0.17 ms for Cast + Mul and 0.12 ms for a
per-tensor DequantizeLinear (2 threads).

A weight-only table (``--weight-only --quantize-embeddings``: blocks of ``B`` columns along each row, one scale and
zero point per block, 4- or 8-bit codes) is looked up the same way: the rows' codes, cut into their blocks
``[ids…, columns / B, B]`` by a Reshape, less their blocks' looked-up zero points, times their looked-up scales, and
put back to ``[ids…, columns]``. ONNX's Gather takes no 4-bit type, so 4-bit codes are held in 8 bits for the
lookup: the table is half as small as it could be, and a 32000 × 1024 lookup took 0.12 ms instead of the 70 ms its
blocked DequantizeLinear of the whole table took on every call (the float lookup: 0.12–0.22 ms).

Refused (logged): a Gather on another axis, blocks down the table's columns or ending in a partial block, codes
that are not a constant 2-D tensor, and a DequantizeLinear read by anything but such Gathers (the table is then
needed whole).
"""

from __future__ import annotations

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.passes.lower import _qdq_patterns as qdq

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """A table quantized in blocks of ``size`` columns (weight-only): codes, one scale (and zero point) per block."""

    size: int
    codes: np.ndarray  # [rows, columns], 8-bit (4-bit codes widened: no Gather reads a 4-bit type)
    scale: ir.Value  # [rows, columns / size]
    zero_point: np.ndarray | None  # [rows, columns / size] as float32, None when absent or all 0


@dataclasses.dataclass(frozen=True)
class _Plan:
    gather: ir.Node
    dequantize: ir.Node
    params: qdq.QuantParams | None
    blocks: _Blocks | None = None


@register
class LowerQuantizedGather(RewritePass):
    """Gather(DQ(q), ids) on axis 0 → the looked-up codes scaled (per row by their looked-up scales, per column by
    the scales on the last axis, per tensor by one DequantizeLinear): only the looked-up rows are dequantized."""

    phase = Phase.LOWER
    summary = "Gather(DequantizeLinear(table), ids) → DequantizeLinear(Gather(table, ids)) (embedding lookups)"

    def match(self, node: ir.Node, context: RewriteContext) -> _Plan | None:
        if not qdq.is_op(node, "Gather") or len(node.inputs) < 2:
            return None
        dequantize = qdq.dequantize_of(node.inputs[0])
        if dequantize is None:
            return None
        return _Plan(node, dequantize, None)

    def check(self, plan: _Plan, context: RewriteContext) -> _Plan | Refusal:
        codes = plan.dequantize.inputs[0]
        if qdq.constant_array(codes) is None or codes.shape is None or len(codes.shape) != 2:
            return Refusal("the table's codes are not a constant 2-D tensor")
        if qdq.attribute(plan.gather, "axis", 0) not in (0, -2):
            return Refusal("the Gather looks up along axis 1, not the table's rows")
        if qdq.attribute(plan.dequantize, "block_size", 0):
            blocks = _blocks(plan.gather, plan.dequantize)
            if isinstance(blocks, str):
                return Refusal(blocks)
            plan = dataclasses.replace(plan, blocks=blocks)
        else:
            params = qdq.read_params(plan.dequantize)
            if isinstance(params, str):
                return Refusal(params)
            plan = dataclasses.replace(plan, params=params)
        table = plan.dequantize.outputs[0]
        if table.is_graph_output():
            return Refusal("the dequantized table is a graph output")
        for reader, _ in table.uses():
            if not qdq.is_op(reader, "Gather") or qdq.attribute(reader, "axis", 0) not in (0, -2):
                return Refusal(f"{reader.op_type} {reader.name} reads the whole dequantized table")
        return plan

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        gather, dequantize, params = plan.gather, plan.dequantize, plan.params
        names = context.names
        output = gather.outputs[0]
        graph = gather.graph
        codes = dequantize.inputs[0]
        if plan.blocks is not None and plan.blocks.codes.dtype != qdq.constant_array(codes).dtype:
            codes = qdq.add_constant(graph, names, f"{codes.name}_8bit", plan.blocks.codes, before=gather)
        rows = ir.node("Gather", [codes, gather.inputs[1]], attributes={"axis": 0},
                       name=names.fresh(f"{gather.name}_integer"))
        rows.outputs[0].name = names.fresh(f"{output.name}_quantized")
        rows.outputs[0].type = ir.TensorType(codes.dtype)
        rows.outputs[0].shape = output.shape
        if params is not None and params.per_tensor:
            inputs = [rows.outputs[0], params.scale] + ([params.zero_point] if params.zero_point is not None else [])
            steps = [_float(ir.node("DequantizeLinear", inputs, name=names.fresh(f"{gather.name}_DequantizeLinear")))]
        else:
            steps = [_float(ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                                    name=names.fresh(f"{gather.name}_Cast")))]
            if plan.blocks is not None:  # [ids…, columns] as [ids…, blocks, size]: one parameter per block
                steps.append(_reshape(graph, names, gather, steps[-1], plan.blocks.codes.shape[1] // plan.blocks.size,
                                      plan.blocks.size))
                scale, zero_point, per_row = plan.blocks.scale, plan.blocks.zero_point, True
            else:  # per row the rows' parameters are looked up with them, per column they apply on the last axis
                zero_point = params.zero_point_array.astype(np.float32)
                scale, zero_point = params.scale, zero_point if np.any(zero_point) else None
                per_row = params.axis in (0, -2)
            steps += _scaled(graph, names, gather, steps[-1].outputs[0], scale, zero_point, per_row)
            if plan.blocks is not None:
                steps.append(_reshape(graph, names, gather, steps[-1], plan.blocks.codes.shape[1]))
        lowered = steps[-1]
        gather.graph.insert_before(gather, [rows, *steps])
        qdq.take_over(output, lowered.outputs[0])
        gather.graph.remove(gather, safe=True)
        qdq.remove_if_unused([dequantize])


def _looked_up(graph: ir.Graph, names, gather: ir.Node, parameters: ir.Value, what: str) -> list[ir.Node]:
    """``Unsqueeze(Gather(parameters, ids), −1)``: one row parameter per looked-up row, broadcast over its columns."""
    axes = qdq.add_constant(graph, names, f"{gather.name}_{what}_axes", np.array([-1], np.int64), before=gather)
    rows = ir.node("Gather", [parameters, gather.inputs[1]], attributes={"axis": 0},
                   name=names.fresh(f"{gather.name}_{what}"))
    expanded = ir.node("Unsqueeze", [rows.outputs[0], axes], name=names.fresh(f"{gather.name}_{what}_unsqueeze"))
    return [_float(rows), _float(expanded)]


def _blocks(gather: ir.Node, dequantize: ir.Node) -> _Blocks | str:
    """The blocks of a DequantizeLinear quantized in blocks along the table's columns, or why it cannot be lowered."""
    size = int(qdq.attribute(dequantize, "block_size", 0))
    codes = qdq.constant_array(dequantize.inputs[0])
    scale = dequantize.inputs[1] if len(dequantize.inputs) > 1 else None
    scale_array = qdq.constant_array(scale)
    zero_point = qdq.constant_array(dequantize.inputs[2]) if len(dequantize.inputs) > 2 else None
    if qdq.attribute(dequantize, "axis", 1) not in (1, -1):
        return "the table is quantized in blocks down its columns (axis 0), not along its rows"
    if scale_array is None or scale_array.dtype != np.float32 or scale_array.shape != (codes.shape[0],
                                                                                      -(-codes.shape[1] // size)):
        return "the blocked table's scales are not a constant float32 [rows, blocks] tensor"
    if codes.shape[1] % size:
        return f"the table's {codes.shape[1]} columns end in a partial block of {size}"
    indices = gather.inputs[1]
    if indices.shape is None:
        return "the rank of the looked-up indices is not known"
    signed = codes.dtype in (np.int8, ml_dtypes.int4)
    if codes.dtype not in (np.int8, np.uint8, ml_dtypes.int4, ml_dtypes.uint4):
        return f"the table's codes are {codes.dtype}, not 4- or 8-bit integers"
    widened = codes.astype(np.int8 if signed else np.uint8)
    offset = None if zero_point is None or not np.any(zero_point) else zero_point.astype(np.float32)
    return _Blocks(size, widened, scale, offset)


def _float(node: ir.Node) -> ir.Node:
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    return node


def _scaled(graph: ir.Graph, names, gather: ir.Node, codes: ir.Value, scale: ir.Value,
            zero_point: np.ndarray | None, per_row: bool) -> list[ir.Node]:
    """``(codes − z) · s``: the parameters looked up with the rows (``per_row``, a trailing axis of 1 added) or
    applied on the last axis; no Sub without a zero point."""
    steps: list[ir.Node] = []
    if zero_point is not None:
        offset = qdq.add_constant(graph, names, f"{gather.name}_zero_point", zero_point, before=gather)
        if per_row:
            steps += _looked_up(graph, names, gather, offset, "zero_point")
            offset = steps[-1].outputs[0]
        steps.append(_float(ir.node("Sub", [codes, offset], name=names.fresh(f"{gather.name}_Sub"))))
        codes = steps[-1].outputs[0]
    if per_row:
        steps += _looked_up(graph, names, gather, scale, "scale")
        scale = steps[-1].outputs[0]
    steps.append(_float(ir.node("Mul", [codes, scale], name=names.fresh(f"{gather.name}_Mul"))))
    return steps


def _reshape(graph: ir.Graph, names, gather: ir.Node, step: ir.Node, *trailing: int) -> ir.Node:
    """``step``'s output with its dimensions after the looked-up indices' replaced by ``trailing``."""
    shape = np.array([0] * len(gather.inputs[1].shape) + list(trailing), np.int64)
    target = qdq.add_constant(graph, names, f"{gather.name}_shape", shape, before=gather)
    return _float(ir.node("Reshape", [step.outputs[0], target], name=names.fresh(f"{gather.name}_Reshape")))

"""LowerQuantizedAttention: a BERT self-attention block whose three projections are integer becomes one
``com.microsoft::QAttention``.

The block, as the lowering leaves it (static or dynamic activations), reads one uint8 activation ``x_q`` (scale
``s_x``, zero point ``z_x``, from a QuantizeLinear or a DynamicQuantizeLinear) with three projections
``MatMulIntegerToFloat(x_q, W_j, s_x, s_j, z_x, z_j, b_j)`` (``j`` = query, key, value; int8 or uint8 weights
``[D, H]``, per tensor or per column)::

    P_j = s_x·s_j · (x_q − z_x)(W_j − z_j) + b_j                                       [B, S, H]
    Q = T(0,2,1,3)(R(P_q)),  K = T(0,2,3,1)(R(P_k)),  V = T(0,2,1,3)(R(P_v))        R: [B, S, N, H/N]
    A = Softmax(α · Q·K + M)                     α: Div(·, c) → 1/c, and Mul(·, f) on Q, K or the scores → f
    Y = R'(T(0,2,1,3)(A·V))                                                            R': [B, S, H]

with the additive mask ``M`` (``[B, 1, 1|S, S]``) a function of one integer or boolean graph input ``m`` of shape
``[B, S]``: 0 where ``m = 1`` and ≤ −10000 where ``m = 0`` (the exporters' ``(1 − m)·finfo.min``, ``(1 − m)·−10000``,
``Where(m == 0, −inf, 0)``). The Q·Kᵀ and A·V products may be float MatMuls or QLinearMatMul on quantized
operands; a Mul by a scalar on an operand or on the scores folds into α.

QAttention (com.microsoft opset 1) computes exactly ``P_j`` with the concatenated weight
``W = [W_q | W_k | W_v]`` (``[D, 3H]``), bias ``[b_q | b_k | b_v]``, weight scales and zero points per column
(``3H``; a scalar when all three are the same scalar), ``num_heads = N`` and ``scale = α``, then the attention in
float with the mask given as ``mask_index = Cast(m, int32)`` (a raw ``[B, S]`` mask: masked positions get
``mask_filter_value = −10000`` added). Softmax sees the same values wherever a row keeps one position
(``exp(−10000 + ·)`` underflows to 0 in float32, as ``exp(finfo.min + ·)`` and ``exp(−inf)`` do). A sequence whose
every position is masked (a batch row of padding only) has no meaningful output in any spelling (uniform weights
with ``finfo.min``, NaN with ``−inf``, softmax of the unmasked scores here). The quantization of ``Q``, ``K``,
``A``, ``V`` in between (QLinearMatMul's operands) is dropped: the integer projection is unchanged and the attention
is computed in float, more precisely than before.

The output: a float ``Y`` is taken over; a quantized ``Y_q`` (the A·V product as QLinearMatMul, the head merge in
uint8) read by one DequantizeLinear gives that DQ's output the float result; read by anything else it is
re-quantized with the same scale and zero point (one QuantizeLinear).

onnxruntime's CPU kernel (as its source reads) runs the projection as 3·B·N integer GEMMs of ``[S, D] × [D, H/N]``
on weights it packs once at session creation and the attention core as float GEMMs with the head transposes folded
into its indexing; what that gains is measured in docs/runtime-facts.md. The pass is one of the fast
transformer kernels (``qgraph.targets.ort_cpu.FAST_TRANSFORMER_PASSES``), not the exact lowering: it drops
quantization steps the QDQ graph simulates (the lowered model is no longer within one step of it, which deploy
parity checks), and on this project's machine it saved little CPU time (the same int8 and float GEMMs run either
way), mostly wall time where many small kernels wait for threads. ``transformer_kernels="auto"``, the default,
takes them after PTQ where they hold against FP32 (:mod:`qgraph.transformer_kernels`).

The head merge's input may also be read by ``Shape`` nodes (directly or through a DequantizeLinear) whose every
reader is a ``Gather`` of index 0 or 1: the TorchScript exporter writes Hugging Face's ``context.size()[:-2] +
(all_head_size,)`` that way. Those Shapes then read the attention's input ``x_q`` ``[B, S, D]``, whose first two
sizes are the same.

Refused (logged): projections that are not MatMulIntegerToFloat with constant 2-D weights of one integer type on
one shared input (one projection left float), an input that is not uint8 of known rank 3 (the rank comes from shape
inference, which qgraph's loader runs), head splits that disagree, a Softmax over another axis, a scale factor that
is not a scalar constant, a mask that is not such a function of one graph input (evaluated on a probe mask with
:mod:`onnx.reference`; a causal or a bias mask fails it).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx.reference import ReferenceEvaluator

from qgraph.ir.values import is_constant
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.passes.lower import _qdq_patterns as qdq

logger = logging.getLogger(__name__)

#: The value onnxruntime adds to masked scores (QAttention's default ``mask_filter_value``).
MASK_FILTER_VALUE = -10000.0
_QUERY_PERM = (0, 2, 1, 3)
_KEY_PERM = (0, 2, 3, 1)
_MASK_NODE_LIMIT = 64


@dataclasses.dataclass(frozen=True)
class _Projection:
    node: ir.Node
    weight: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bias: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Operand:
    """A head-split operand traced back to its projection."""

    projection: ir.Node
    factor: float
    heads: int
    head_size: int
    nodes: tuple[ir.Node, ...]


@dataclasses.dataclass(frozen=True)
class _Plan:
    softmax: ir.Node
    projections: tuple[_Projection, _Projection, _Projection]
    heads: int
    scale: float
    mask_input: ir.Value | None
    merged: ir.Value
    #: (scale, zero point) values of a quantized merged output, None when it is float.
    merged_quantization: tuple[ir.Value, ir.Value] | None
    nodes: tuple[ir.Node, ...]
    #: Shape nodes that read the head merge's input for its batch and sequence sizes: they read the attention's
    #: input instead, which has them at the same positions.
    shapes: tuple[ir.Node, ...] = ()


def _rank(value: ir.Value) -> int | None:
    """The rank of a quantized activation, or of the float tensor its QuantizeLinear/DynamicQuantizeLinear read."""
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if qdq.is_op(producer, qdq.QUANTIZE, "DynamicQuantizeLinear") and producer.inputs[0].shape is not None:
        return len(producer.inputs[0].shape)
    return None


def _scalar(value: ir.Value | None) -> float | None:
    array = qdq.constant_array(value)
    if array is None or array.size != 1 or array.dtype != np.float32:
        return None
    return float(array.reshape(-1)[0])


def _scalar_operand(node: ir.Node) -> tuple[ir.Value, float] | None:
    """``(data, c)`` for a Mul/Div with one scalar float constant operand (Div: only as divisor)."""
    if len(node.inputs) != 2:
        return None
    left, right = node.inputs
    if qdq.is_op(node, "Div"):
        divisor = _scalar(right)
        return (left, 1.0 / divisor) if divisor else None
    if qdq.is_op(node, "Mul"):
        for data, constant in ((left, right), (right, left)):
            factor = _scalar(constant)
            if factor is not None and not is_constant(data):
                return data, factor
    return None


def _through_quantization(value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """The float value behind a QuantizeLinear output or a Q → DQ pair."""
    producer = value.producer()
    if qdq.is_op(producer, qdq.DEQUANTIZE):
        inner = producer.inputs[0].producer()
        if qdq.is_op(inner, qdq.QUANTIZE):
            nodes += [producer, inner]
            return inner.inputs[0]
        return value
    if qdq.is_op(producer, qdq.QUANTIZE):
        nodes.append(producer)
        return producer.inputs[0]
    return value


def _head_split(shape: ir.Value) -> tuple[int, int] | None:
    """(heads, head size) of a Reshape target ``[·, ·, N, d]``: a constant or a Concat of four pieces."""
    array = qdq.constant_array(shape)
    if array is not None:
        return (int(array[2]), int(array[3])) if array.shape == (4,) and min(array[2], array[3]) > 0 else None
    producer = shape.producer()
    if not qdq.is_op(producer, "Concat") or len(producer.inputs) != 4:
        return None
    pieces = [qdq.constant_array(value) for value in producer.inputs[2:]]
    if any(piece is None or piece.size != 1 for piece in pieces):
        return None
    heads, size = (int(piece.reshape(-1)[0]) for piece in pieces)  # type: ignore[union-attr]
    return (heads, size) if heads > 0 and size > 0 else None


def _operand(value: ir.Value, perm: tuple[int, ...]) -> _Operand | str:
    """Trace ``value`` back through quantization, scalar Muls, the Transposes that together permute by ``perm``
    (one, or Hugging Face's ``permute(0, 2, 1, 3)`` then ``transpose(-1, -2)`` for the keys) and the head-split
    Reshape.

    Transposes compose as ``T_q(T_p(x)) = T_c(x)`` with ``c[i] = p[q[i]]``: walking from the operand inwards, each
    Transpose met maps the permutation so far through its own.
    """
    nodes: list[ir.Node] = []
    factor = 1.0
    composite: tuple[int, ...] | None = None
    while True:
        value = _through_quantization(value, nodes)
        producer = value.producer()
        scaled = _scalar_operand(producer) if qdq.is_op(producer, "Mul") else None
        if scaled is not None:
            nodes.append(producer)
            value, factor = scaled[0], factor * scaled[1]
            continue
        if qdq.is_op(producer, "Transpose"):
            own = tuple(int(axis) for axis in qdq.attribute(producer, "perm", ()))
            if sorted(own) != list(range(len(perm))):
                return f"{producer.name} transposes with {qdq.attribute(producer, 'perm', None)}, expected {perm}"
            composite = own if composite is None else tuple(own[axis] for axis in composite)
            nodes.append(producer)
            value = producer.inputs[0]
            continue
        break
    if composite is not None and composite != perm:
        return f"the operand's Transposes permute by {composite}, expected {perm}"
    if composite is None or not qdq.is_op(producer, "Reshape"):
        return f"{value.name} is not a head split (Reshape then Transpose{perm})"
    split = _head_split(producer.inputs[1])
    if split is None:
        return f"the head split {producer.name} has no constant [·, ·, heads, size] target"
    nodes.append(producer)
    projection = producer.inputs[0].producer()
    if not qdq.is_op(projection, "MatMulIntegerToFloat", domain=qdq.MICROSOFT_DOMAIN):
        return f"{producer.inputs[0].name} is not produced by an integer projection (MatMulIntegerToFloat)"
    return _Operand(projection, factor, *split, tuple(nodes))


def _product(value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value] | None:
    """The two operands of the product that ``value`` is: a float MatMul or DQ(QLinearMatMul(Q(a), Q(b)))."""
    producer = value.producer()
    if qdq.is_op(producer, "MatMul"):
        nodes.append(producer)
        return producer.inputs[0], producer.inputs[1]
    if qdq.is_op(producer, qdq.DEQUANTIZE):
        inner = producer.inputs[0].producer()
        if qdq.is_op(inner, "QLinearMatMul"):
            nodes += [producer, inner]
            return inner.inputs[0], inner.inputs[3]
    return None


def _projection(node: ir.Node) -> _Projection | str:
    if len(node.inputs) < 6 or any(value is None for value in node.inputs[:6]):
        return f"{node.name} lacks scales or zero points"
    weight = qdq.constant_array(node.inputs[1])
    scale = qdq.constant_array(node.inputs[3])
    zero_point = qdq.constant_array(node.inputs[5])
    if weight is None or weight.ndim != 2 or weight.dtype not in (np.int8, np.uint8):
        return f"{node.name} has no constant 2-D int8/uint8 weight"
    columns = weight.shape[1]
    if scale is None or scale.dtype != np.float32 or scale.size not in (1, columns):
        return f"{node.name} has no constant weight scale per tensor or per column"
    if zero_point is None or zero_point.dtype != weight.dtype or zero_point.size not in (1, columns):
        return f"{node.name} has no constant weight zero point per tensor or per column"
    bias_value = node.inputs[6] if len(node.inputs) > 6 else None
    bias = np.zeros(columns, np.float32) if bias_value is None else qdq.constant_array(bias_value)
    if bias is None or bias.dtype != np.float32 or bias.shape != (columns,):
        return f"{node.name} has a bias that is not a float32 constant [N]"
    return _Projection(node, weight, scale.reshape(-1), zero_point.reshape(-1), bias)


def _mask_subgraph(mask: ir.Value) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]] | str:
    """Nodes computing ``mask`` (in order), the graph inputs it reads and the constants, or why it is no mask."""
    nodes: list[ir.Node] = []
    inputs: list[ir.Value] = []
    constants: list[ir.Value] = []
    pending, seen = [mask], set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_input():
            inputs.append(value)
            continue
        if is_constant(value):
            constants.append(value)
            continue
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx") or producer.graph is not mask.graph:
            return f"{value.name} is not computed by standard operators from graph inputs"
        if producer not in nodes:
            nodes.append(producer)
            if len(nodes) > _MASK_NODE_LIMIT:
                return "the mask is computed by too many nodes"
            pending.extend(value for value in producer.inputs if value is not None)
    order = {id(node): index for index, node in enumerate(mask.graph)}
    nodes.sort(key=lambda node: order[id(node)])
    return nodes, inputs, constants


def _probe_mask(batch: int, sequence: int) -> np.ndarray:
    """Row ``b`` keeps its first ``max(1, S − 1 − b)`` positions: every row keeps one, most mask some."""
    keep = np.maximum(1, sequence - 1 - np.arange(batch))[:, None]
    return (np.arange(sequence)[None, :] < keep).astype(np.int64)


def _mask_source(mask: ir.Value, opset: int) -> ir.Value | str:
    """The ``[B, S]`` graph input the additive mask is computed from, checked on a probe mask."""
    found = _mask_subgraph(mask)
    if isinstance(found, str):
        return found
    nodes, inputs, constants = found
    content = [value for value in inputs
               if any(not qdq.is_op(use.node, "Shape") for use in value.uses() if use.node in nodes)]
    if len(content) != 1:
        return f"the mask reads {len(content)} graph inputs by value, expected one"
    source = content[0]
    if source.shape is None or len(source.shape) != 2 or source.dtype not in (
            ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL):
        return f"the mask source {source.name} is not a 2-D int64/int32/bool input"
    sizes = [size if isinstance(size, int) else default for size, default in zip(source.shape, (2, 6))]
    batch, sequence = sizes
    probe = _probe_mask(batch, sequence)
    feeds = {}
    for value in inputs:
        dims = [size if isinstance(size, int) else default
                for size, default in zip(value.shape or (), (batch, sequence, 1, 1))]
        feeds[value.name] = (probe if value is source else np.zeros(dims, np.int64)).astype(value.dtype.numpy())
    graph = helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes], "mask",
        [helper.make_tensor_value_info(value.name, int(value.dtype), None) for value in inputs],
        [helper.make_tensor_value_info(mask.name, onnx.TensorProto.FLOAT, None)],
        initializer=[ir.serde.serialize_tensor(value.const_value) for value in constants
                     if value.const_value is not None],
    )
    try:
        probe_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        result = np.asarray(ReferenceEvaluator(probe_model).run(None, feeds)[0])
    except Exception as error:  # noqa: BLE001 - any failure of the evaluation means: not a mask we understand
        return f"the mask could not be evaluated on a probe ({type(error).__name__}: {error})"
    if result.ndim != 4 or result.shape[0] != batch or result.shape[1] != 1 or result.shape[3] != sequence:
        return f"the mask has shape {result.shape}, expected [{batch}, 1, 1 or {sequence}, {sequence}]"
    expected_kept = np.broadcast_to(probe[:, None, None, :] == 1, result.shape)
    if not (np.all(result[expected_kept] == 0) and np.all(result[~expected_kept] <= MASK_FILTER_VALUE)):
        return "the mask is not 0 where the attention mask is 1 and <= -10000 where it is 0"
    return source


def _batch_and_sequence_reader(node: ir.Node) -> bool:
    """A ``Shape`` (whole, no start/end) whose every reader is a ``Gather`` of index 0 or 1 on axis 0: it asks
    only the batch and sequence sizes, which the rank-3 attention input has at the same positions."""
    if not qdq.is_op(node, "Shape") or "start" in node.attributes or "end" in node.attributes:
        return False
    output = node.outputs[0]
    if output.is_graph_output() or not output.uses():
        return False
    for use in output.uses():
        reader = use.node
        if not qdq.is_op(reader, "Gather") or use.idx != 0 or int(qdq.attribute(reader, "axis", 0)) != 0:
            return False
        index = qdq.constant_array(reader.inputs[1])
        if index is None or index.size != 1 or not np.issubdtype(index.dtype, np.integer) \
                or int(index.reshape(-1)[0]) not in (0, 1):
            return False
    return True


def _shape_readers(value: ir.Value, reshape: ir.Node, nodes: list[ir.Node]) -> list[ir.Node] | None:
    """The readers of the head-merge input ``value`` besides ``reshape`` when each only asks its batch and sequence
    sizes (TorchScript's ``x.size()[:-2] + (all_head_size,)``): the Shape nodes, directly or through one
    DequantizeLinear read by such Shapes alone (those DQs go to ``nodes``); None when another reader is there."""
    shapes: list[ir.Node] = []
    for use in value.uses():
        reader = use.node
        if reader is reshape:
            continue
        if qdq.is_op(reader, qdq.DEQUANTIZE) and not reader.outputs[0].is_graph_output() and reader.outputs[0].uses() \
                and all(_batch_and_sequence_reader(inner.node) for inner in reader.outputs[0].uses()):
            shapes += [inner.node for inner in reader.outputs[0].uses()]
            nodes.append(reader)
        elif _batch_and_sequence_reader(reader):
            shapes.append(reader)
        else:
            return None
    return shapes


def _merge(product_output: ir.Value, nodes: list[ir.Node], shapes: list[ir.Node]) -> ir.Value | str:
    """The head merge ``Reshape(Transpose(0,2,1,3)(·), [·, ·, H])`` after the A·V product, through DQs; the Shape
    nodes that read the Reshape's input for its batch and sequence sizes go to ``shapes``."""
    value = product_output
    for op_type in ("Transpose", "Reshape"):
        consumer = qdq.sole_consumer(value)
        if qdq.is_op(consumer, qdq.DEQUANTIZE):
            nodes.append(consumer)
            value = consumer.outputs[0]
            consumer = qdq.sole_consumer(value)
        if consumer is None and op_type == "Reshape" and not value.is_graph_output():
            reshapes = [use.node for use in value.uses() if qdq.is_op(use.node, "Reshape") and use.idx == 0]
            found = _shape_readers(value, reshapes[0], nodes) if len(reshapes) == 1 else None
            if found is not None:
                consumer = reshapes[0]
                shapes += found
        if not qdq.is_op(consumer, op_type):
            return f"{value.name} is not read by the head merge's {op_type} alone"
        if op_type == "Transpose" and tuple(qdq.attribute(consumer, "perm", ())) != _QUERY_PERM:
            return f"{consumer.name} does not merge heads (perm {qdq.attribute(consumer, 'perm', None)})"
        nodes.append(consumer)
        value = consumer.outputs[0]
    return value


def _concatenate(parts: list[np.ndarray], hidden: int) -> np.ndarray:
    """Per-tensor or per-column parameters of the three projections as one array (a scalar if all are one)."""
    if all(part.size == 1 for part in parts) and all(part[0] == parts[0][0] for part in parts):
        return parts[0].reshape(())
    return np.concatenate([np.broadcast_to(part, (hidden,)) for part in parts])


def _remove_dead(nodes: list[ir.Node]) -> None:
    """Remove the nodes nobody reads any more, then their producers that became unread (shape and mask nodes)."""
    pending = list(nodes)
    while pending:
        node = pending.pop(0)
        if node.graph is None or any(output.uses() or output.is_graph_output() for output in node.outputs):
            continue
        producers = [value.producer() for value in node.inputs if value is not None]
        qdq.remove_if_unused([node])
        pending += [producer for producer in producers if producer is not None]


@register
class LowerQuantizedAttention(RewritePass):
    """Lower a self-attention block with integer projections to com.microsoft QAttention."""

    phase = Phase.LOWER
    summary = "integer Q/K/V projections → softmax(α·QKᵀ + mask)·V → head merge becomes com.microsoft QAttention"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        return node if qdq.is_op(node, "Softmax") else None

    def check(self, softmax: ir.Node, context: RewriteContext) -> _Plan | Refusal:
        axis = int(qdq.attribute(softmax, "axis", -1))
        if axis not in (-1, 3):
            return Refusal(f"Softmax over axis {axis}, not the keys")
        nodes: list[ir.Node] = [softmax]
        scores, mask, scale = softmax.inputs[0], None, 1.0
        producer = scores.producer()
        product = None
        if qdq.is_op(producer, "Add") and len(producer.inputs) == 2:
            for index in (0, 1):
                trial: list[ir.Node] = []
                found = self._scaled_product(producer.inputs[index], trial)
                if found is not None:
                    mask, product = producer.inputs[1 - index], found
                    nodes += [producer, *trial]
                    break
        else:
            product = self._scaled_product(scores, nodes)
        if product is None:
            return Refusal("the Softmax input is not a (masked, scaled) product of two operands")
        (query_value, key_value), factor = product
        scale *= factor
        value_product: list[ir.Node] = []
        reader = self._value_product(softmax, value_product)
        if isinstance(reader, str):
            return Refusal(reader)
        value_value, product_output = reader
        nodes += value_product
        shapes: list[ir.Node] = []
        merged = _merge(product_output, nodes, shapes)
        if isinstance(merged, str):
            return Refusal(merged)
        operands = []
        for value, perm in ((query_value, _QUERY_PERM), (key_value, _KEY_PERM), (value_value, _QUERY_PERM)):
            operand = _operand(value, perm)
            if isinstance(operand, str):
                return Refusal(operand)
            operands.append(operand)
            nodes += operand.nodes
        query, key, value = operands
        if value.factor != 1.0:
            return Refusal("the value operand is scaled")
        scale *= query.factor * key.factor
        if len({(operand.heads, operand.head_size) for operand in operands}) != 1:
            return Refusal("the query, key and value head splits differ")
        projections = []
        for operand in operands:
            projection = _projection(operand.projection)
            if isinstance(projection, str):
                return Refusal(projection)
            projections.append(projection)
        first = projections[0].node
        for projection in projections[1:]:
            if any(projection.node.inputs[index] is not first.inputs[index] for index in (0, 2, 4)):
                return Refusal("the three projections do not read one quantized input")
            if projection.weight.dtype != projections[0].weight.dtype:
                return Refusal("the projection weights differ in integer type")
            if projection.weight.shape != projections[0].weight.shape:
                return Refusal("the projection weights differ in shape")
        data = first.inputs[0]
        if data.dtype != ir.DataType.UINT8 or _rank(data) != 3:
            return Refusal(f"the projections' input {data.name} is not a uint8 tensor of known rank 3")
        hidden = projections[0].weight.shape[1]
        if query.heads * query.head_size != hidden:
            return Refusal(f"{query.heads} heads of {query.head_size} do not make the hidden size {hidden}")
        mask_input = None
        if mask is not None:
            source = _mask_source(mask, qdq.default_opset(context.model))
            if isinstance(source, str):
                return Refusal(source)
            mask_input = source
        quantization = None
        if merged.dtype == ir.DataType.UINT8:
            quantized_product = value_product[-1]
            if not qdq.is_op(quantized_product, "QLinearMatMul"):
                return Refusal("the merged output is uint8 but not written by QLinearMatMul")
            quantization = (quantized_product.inputs[6], quantized_product.inputs[7])
        elif merged.dtype != ir.DataType.FLOAT:
            return Refusal(f"the merged output is {merged.dtype}")
        return _Plan(softmax, tuple(projections), query.heads, scale, mask_input, merged,  # type: ignore[arg-type]
                     quantization, tuple(nodes), tuple(shapes))

    @staticmethod
    def _scaled_product(value: ir.Value, nodes: list[ir.Node]) -> tuple[tuple[ir.Value, ir.Value], float] | None:
        factor = 1.0
        producer = value.producer()
        while qdq.is_op(producer, "Div", "Mul"):
            scaled = _scalar_operand(producer)
            if scaled is None:
                return None
            nodes.append(producer)
            value, factor = scaled[0], factor * scaled[1]
            producer = value.producer()
        operands = _product(value, nodes)
        return (operands, factor) if operands is not None else None

    @staticmethod
    def _value_product(softmax: ir.Node, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value] | str:
        """(V operand, product output) of the product that reads the probabilities as its left operand."""
        probabilities = softmax.outputs[0]
        readers = [use.node for use in probabilities.uses()]
        if len(readers) != 1 or probabilities.is_graph_output():
            return "the probabilities are read by more than the A·V product"
        reader = readers[0]
        if qdq.is_op(reader, "MatMul") and reader.inputs[0] is probabilities:
            nodes.append(reader)
            return reader.inputs[1], reader.outputs[0]
        if qdq.is_op(reader, qdq.QUANTIZE):
            product = qdq.sole_consumer(reader.outputs[0])
            if qdq.is_op(product, "QLinearMatMul") and product.inputs[0] is reader.outputs[0]:
                nodes += [reader, product]
                return product.inputs[3], product.outputs[0]
        return "the probabilities do not feed a MatMul as its left operand"

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        graph = plan.softmax.graph
        names = context.names
        first = plan.projections[0].node
        hidden = plan.projections[0].weight.shape[1]
        weight = np.concatenate([projection.weight for projection in plan.projections], axis=1)
        scale = _concatenate([projection.scale for projection in plan.projections], hidden)
        zero_point = _concatenate([projection.zero_point for projection in plan.projections], hidden)
        bias = np.concatenate([projection.bias for projection in plan.projections])
        base = qdq.derived_name(plan.softmax, "attention") or "attention"
        anchor = plan.merged.producer()
        constants = [qdq.add_constant(graph, names, f"{base}_{suffix}", array, before=anchor)
                     for suffix, array in (("weight", weight), ("bias", bias), ("weight_scale", scale),
                                           ("weight_zero_point", zero_point))]
        mask_index = self._mask_index(graph, names, plan.mask_input, anchor) if plan.mask_input is not None else None
        inputs = [first.inputs[0], constants[0], constants[1], first.inputs[2], constants[2], mask_index,
                  first.inputs[4], constants[3]]
        attention = ir.Node(qdq.MICROSOFT_DOMAIN, "QAttention", inputs,
                            attributes=[ir.AttrInt64("num_heads", plan.heads), ir.AttrFloat32("scale", plan.scale)],
                            name=names.fresh(base))
        output = attention.outputs[0]
        output.name = names.fresh(f"{base}_output")
        output.type = ir.TensorType(ir.DataType.FLOAT)
        output.shape = plan.merged.shape
        graph.insert_before(anchor, attention)
        qdq.ensure_microsoft_domain(context.model, graph)
        for shape in plan.shapes:  # dims 0 and 1 of [B, S, N, H/N] are those of the input [B, S, D]
            shape.replace_input_with(0, first.inputs[0])
        removed = list(plan.nodes)
        if plan.merged_quantization is None:
            qdq.take_over(plan.merged, output)
        else:
            reader = qdq.sole_consumer(plan.merged)
            if qdq.is_op(reader, qdq.DEQUANTIZE):
                qdq.take_over(reader.outputs[0], output)
                removed.insert(0, reader)
            else:
                requantize = ir.Node("", qdq.QUANTIZE, [output, *plan.merged_quantization],
                                     name=names.fresh(f"{base}_requantize"))
                requantize.outputs[0].type = plan.merged.type
                graph.insert_after(attention, requantize)
                qdq.take_over(plan.merged, requantize.outputs[0])
        _remove_dead([anchor, *removed, *(projection.node for projection in plan.projections)])
        logger.debug("lowered the attention around %s to QAttention (%d heads)", plan.softmax.name, plan.heads)

    @staticmethod
    def _mask_index(graph: ir.Graph, names, source: ir.Value, anchor: ir.Node) -> ir.Value:
        """``source`` as int32: itself, an existing ``Cast(source, to=INT32)``, or a new one at the top."""
        if source.dtype == ir.DataType.INT32:
            return source
        for use in source.uses():
            node = use.node
            if qdq.is_op(node, "Cast") and node.graph is graph and qdq.attribute(node, "to") == ir.DataType.INT32:
                return node.outputs[0]
        cast = ir.Node("", "Cast", [source], attributes=[ir.AttrInt64("to", ir.DataType.INT32)],
                       name=names.fresh(f"{source.name}_int32"))
        cast.outputs[0].name = names.fresh(f"{source.name}_int32")
        cast.outputs[0].type = ir.TensorType(ir.DataType.INT32)
        cast.outputs[0].shape = source.shape
        graph.insert_before(next(iter(graph)), cast)
        return cast.outputs[0]

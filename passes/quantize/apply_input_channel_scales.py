"""ApplyInputChannelScales: AWQ's equivalent rescaling, ``y = x·W = (x ⊘ s)·(diag(s)·W)``.

``scales`` maps a tensor x ``[..., K]`` to positive per-channel scales s ``[K]``. Every reader of x must be a
MatMul (or Gemm without transA) with a constant 2-D weight; each gets the new weight ``diag(s)·W`` (rows of W, or
columns of a ``transB`` Gemm weight, times s). The division of x by s goes, in this order of preference, into:

- an RMSNorm gain: x = ``Mul(γ, t)`` with a constant γ of shape ``[K]`` (or ``[1, …, K]``) → ``γ ⊘ s``;
- a LayerNormalization on the last axis with constant scale γ and bias β → ``γ ⊘ s``, ``β ⊘ s``
  (``LN(t)·γ/s + β/s = (LN(t)·γ + β)/s``);
- a gating product x = ``Mul(a, b)`` where b (or a) is the output of a MatMul with a constant weight ``V [·, K]``
  read by nothing else (optionally through a bias ``Add``) → the columns of V (and the bias) ``⊘ s``, since
  ``a ⊙ (t·V)/s = (a ⊙ t·V) ⊘ s``;
- otherwise an explicit ``Mul(x, 1/s)`` in front of the readers.

A fold needs x to be read by the scaled layers only (and by no graph output); otherwise the explicit Mul is used.
Every value changes only by float rounding. The scaled readers are marked (``qgraph.input_scaled`` metadata), so
a second run changes nothing. Refused (logged): a reader that is not a MatMul/Gemm with a constant 2-D weight of K
rows, scales that are not positive and finite.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer
from qgraph.ir.values import constant_array, is_constant, is_op
from qgraph.passes.infrastructure import Phase, QGraphPass, Refusal, RewriteContext, RewritePass, register

logger = logging.getLogger(__name__)

MARK = "qgraph.input_scaled"


@dataclasses.dataclass(frozen=True)
class _Plan:
    value: ir.Value
    scales: np.ndarray
    readers: tuple[ir.Node, ...]
    #: "gain", "layer_norm", "gate" or "mul", and the node (and input index) the fold edits.
    fold: str
    target: ir.Node | None
    target_index: int


def _weight_of(reader: ir.Node) -> tuple[np.ndarray, bool] | None:
    """The reader's constant weight and whether it is stored transposed (Gemm transB)."""
    if is_op(reader, "MatMul"):
        transposed = False
    elif is_op(reader, "Gemm") and not (reader.attributes.get("transA") and reader.attributes["transA"].value):
        transposed = bool(reader.attributes.get("transB") and reader.attributes["transB"].value)
    else:
        return None
    array = constant_array(reader.inputs[1])
    if array is None or array.ndim != 2:
        return None
    return array, transposed


def _only_read_by(value: ir.Value, readers: set[ir.Node]) -> bool:
    return not value.is_graph_output() and {use.node for use in value.uses()} <= readers


@register
class ApplyInputChannelScales(QGraphPass):
    """Multiply the readers' weights by per-input-channel scales and divide their input by them (AWQ)."""

    phase = Phase.QUANTIZE
    summary = "x·W becomes (x ⊘ s)·(diag(s)·W), the division folded into x's producer where possible (AWQ)"

    #: Driven by the data given at construction (as InsertQuantizeDequantize is by its plan), so not a RewritePass
    #: of the registry's no-argument protocol; it runs the same match / check / rewrite loop.
    call = RewritePass.call

    def __init__(self, *, scales: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.scales = {name: np.asarray(array, np.float64) for name, array in scales.items()}

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Value | None:
        # a tensor is matched at its first reader in graph order
        for value in node.inputs:
            if value is None or value.name not in self.scales:
                continue
            readers = [use.node for use in value.uses()]
            if readers and readers[0] is node and not any(MARK in reader.metadata_props for reader in readers):
                return value
        return None

    def check(self, value: ir.Value, context: RewriteContext) -> _Plan | Refusal:
        scales = self.scales[value.name]
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            return Refusal(f"the scales of {value.name} are not all positive and finite")
        readers = tuple(dict.fromkeys(use.node for use in value.uses()))
        for reader in readers:
            weight = _weight_of(reader)
            if weight is None or reader.inputs[0] is not value:
                return Refusal(f"{reader.name} ({reader.op_type}) is not a MatMul/Gemm reading {value.name} with a "
                               "constant 2-D weight")
            rows = weight[0].shape[1] if weight[1] else weight[0].shape[0]
            if rows != scales.size:
                return Refusal(f"{reader.name}'s weight has {rows} input rows, the scales {scales.size}")
        fold, target, index = self._fold(value, set(readers), scales.size)
        return _Plan(value, scales, readers, fold, target, index)

    @staticmethod
    def _fold(value: ir.Value, readers: set[ir.Node], size: int) -> tuple[str, ir.Node | None, int]:
        producer = value.producer()
        if producer is None or not _only_read_by(value, readers):
            return "mul", None, -1
        if is_op(producer, "Mul"):
            for index, operand in enumerate(producer.inputs):
                array = constant_array(operand)
                if array is not None and array.size == size and array.shape[-1] == size:
                    return "gain", producer, index
            for index, operand in enumerate(producer.inputs):
                source = operand.producer() if operand is not None else None
                if source is not None and is_op(source, "Add") and _only_read_by(operand, {producer}):
                    matmul_input = next((i for i, v in enumerate(source.inputs) if v is not None
                                         and v.producer() is not None and is_op(v.producer(), "MatMul")), None)
                    bias_input = 1 - matmul_input if matmul_input is not None else None
                    if matmul_input is not None and is_constant(source.inputs[bias_input]):
                        inner = source.inputs[matmul_input]
                        if _only_read_by(inner, {source}) and _gate_weight(inner.producer(), size):
                            return "gate_bias", source, matmul_input
                if source is not None and is_op(source, "MatMul") and _only_read_by(operand, {producer}) \
                        and _gate_weight(source, size):
                    return "gate", source, index
        if is_op(producer, "LayerNormalization") and len(producer.inputs) == 3:
            axis = producer.attributes.get("axis")
            if (axis is None or axis.value == -1) and is_constant(producer.inputs[1]) \
                    and is_constant(producer.inputs[2]):
                return "layer_norm", producer, 1
        return "mul", None, -1

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        value, scales = plan.value, plan.scales
        graph = plan.readers[0].graph
        for reader in plan.readers:
            array, transposed = _weight_of(reader)  # type: ignore[misc]
            scaled = array * (scales[None, :] if transposed else scales[:, None])
            old = reader.inputs[1]
            reader.replace_input_with(1, new_initializer(graph, context.names, f"{old.name}_awq",
                                                         scaled.astype(array.dtype)))
            drop_unused_initializers([old])
            reader.metadata_props[MARK] = "1"
        inverse = 1.0 / scales
        if plan.fold == "gain":
            self._divide_input(plan.target, plan.target_index, inverse, context)
        elif plan.fold == "layer_norm":
            self._divide_input(plan.target, 1, inverse, context)
            self._divide_input(plan.target, 2, inverse, context)
        elif plan.fold in ("gate", "gate_bias"):
            matmul = plan.target if plan.fold == "gate" else plan.target.inputs[plan.target_index].producer()
            weight = constant_array(matmul.inputs[1])
            old = matmul.inputs[1]
            matmul.replace_input_with(1, new_initializer(graph, context.names, f"{old.name}_awq",
                                                         (weight * inverse[None, :]).astype(weight.dtype)))
            drop_unused_initializers([old])
            if plan.fold == "gate_bias":
                self._divide_input(plan.target, 1 - plan.target_index, inverse, context)
        else:
            divisor = new_initializer(graph, context.names, f"{value.name}_awq_inverse_scales",
                                      inverse.astype(np.float32))
            multiply = ir.Node("", "Mul", [value, divisor], name=context.names.fresh(f"{value.name}_awq_scale"))
            multiply.outputs[0].name = context.names.fresh(f"{value.name}_awq_scaled")
            multiply.outputs[0].type, multiply.outputs[0].shape = value.type, value.shape
            graph.insert_before(plan.readers[0], [multiply])
            for reader in plan.readers:
                reader.replace_input_with(0, multiply.outputs[0])
        logger.debug("%s: %d readers scaled, division folded as %s", value.name, len(plan.readers), plan.fold)

    @staticmethod
    def _divide_input(node: ir.Node, index: int, inverse: np.ndarray, context: RewriteContext) -> None:
        old = node.inputs[index]
        array = constant_array(old)
        divided = (array * inverse.reshape(array.shape)).astype(array.dtype)
        node.replace_input_with(index, new_initializer(node.graph, context.names, f"{old.name}_awq", divided))
        drop_unused_initializers([old])


def _gate_weight(matmul: ir.Node | None, size: int) -> bool:
    if matmul is None or not is_op(matmul, "MatMul"):
        return False
    array = constant_array(matmul.inputs[1])
    return array is not None and array.ndim == 2 and array.shape[1] == size

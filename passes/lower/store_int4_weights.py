"""StoreInt4Weights: a 4-bit weight held as int8 codes behind a DequantizeLinear is stored as int4 (opset 21).

Quantization writes every weight as ``DQ(q, s, z; axis)`` with ``q`` in an int8 (or uint8) initializer, whatever the
bit width: a 4-bit weight's codes lie in [-8, 7] (``--weight-bits 4`` uses [-7, 7]) yet take a byte each, so the
file is as large as an INT8 one. DequantizeLinear takes int4/uint4 from opset 21, per tensor, per axis and blocked,
and computes the same ``s · (q − z)``; so a DequantizeLinear over constant codes is rewritten as

    DQ(q: int8 ∈ [-8, 7], s, z: int8 ∈ [-8, 7]; axis)   →   DQ(q: int4, s, z: int4; axis)
    DQ(q: uint8 ∈ [0, 15], s, z: uint8 ∈ [0, 15]; axis) →   DQ(q: uint4, s, z: uint4; axis)

which changes no value (the output is bit for bit the same) and halves the codes twice: two per byte. A weight that a
QOperator kernel already reads (QLinearConv, QLinearMatMul, ...: onnxruntime has no int4 integer kernel, see
``docs/runtime-facts.md``) is not behind a DequantizeLinear and stays int8; what this pass stores is what the QDQ
format keeps, and what a lowering leaves behind a DequantizeLinear.

**Opset.** A model below opset 21 is converted first with :func:`qgraph.ir.opset_upgrade.upgrade_opset` (onnx's
version converter, checked on seeded random inputs before and after), and only when it holds something to store.
The upgrade is refused (logged; the weights stay int8 codes, correct and larger) when the conversion fails or
changes an output, when the installed onnxruntime runs no opset 21, or when it would break the model in the installed
onnxruntime: onnxruntime 1.19 has no ``QLinearMatMul`` kernel at opset 21 (the operator's version 21 came with it),
so an opset-21 model with a QLinearMatMul — or with a QDQ MatMul of two 8-bit operands, which its graph optimiser
fuses into one — fails to load there. Which runtimes have that kernel is probed once, not assumed.

Refused (logged): codes or zero points beyond the 4-bit range (an 8-bit weight), codes that are not constants.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from qgraph import runtime
from qgraph.ir.edit import drop_unused_initializers, new_initializer
from qgraph.ir.opset_upgrade import adopt, runtime_opset_cap, upgrade_opset
from qgraph.ir.traversal import iterate_graphs
from qgraph.ir.values import constant_array, default_opset, is_constant, is_op
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register

logger = logging.getLogger(__name__)

MINIMUM_OPSET = 21
#: Stored 8-bit code type -> (4-bit numpy type, lowest code, highest code).
_FOUR_BIT = {
    ir.DataType.INT8: (ml_dtypes.int4, -8, 7),
    ir.DataType.UINT8: (ml_dtypes.uint4, 0, 15),
}
_EIGHT_BIT = frozenset({ir.DataType.INT8, ir.DataType.UINT8})
#: Operators whose int8-coded QDQ form onnxruntime fuses into an integer kernel, and whose int4 form it runs in float.
FLOAT_COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


@dataclasses.dataclass(frozen=True)
class _Plan:
    dequantize: ir.Node
    codes: np.ndarray
    zero_point: np.ndarray | None


def _codes_value(node: ir.Node) -> ir.Value | None:
    value = node.inputs[0] if node.inputs else None
    return value if is_constant(value) and value.dtype in _FOUR_BIT else None


@functools.lru_cache(maxsize=1)
def runtime_runs_qlinear_matmul_at_21() -> bool:
    """Whether the installed onnxruntime has a QLinearMatMul kernel for an opset-21 model (1.19 has none)."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(np.float32(1.0), "scale"), numpy_helper.from_array(np.uint8(0), "zero"),
                    numpy_helper.from_array(np.ones((2, 2), np.int8), "b"),
                    numpy_helper.from_array(np.int8(0), "b_zero")]
    node = helper.make_node("QLinearMatMul", ["a", "scale", "zero", "b", "scale", "b_zero", "scale", "zero"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 2])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MINIMUM_OPSET)], ir_version=10)
    try:
        runtime.create_session(model).run(None, {"a": np.ones((1, 2), np.uint8)})
    except Exception as error:  # onnxruntime raises its own exception types with the reason
        logger.debug("onnxruntime runs no QLinearMatMul at opset %d: %s", MINIMUM_OPSET, error)
        return False
    return True


def _eight_bit_dequantized(value: ir.Value | None, converted: frozenset[ir.Node]) -> bool:
    producer = value.producer() if value is not None else None
    if producer is None or not is_op(producer, "DequantizeLinear") or producer in converted:
        return False
    return producer.inputs[0] is not None and producer.inputs[0].dtype in _EIGHT_BIT


def qlinear_matmul_nodes(model: ir.Model, converted: frozenset[ir.Node] = frozenset()) -> list[str]:
    """The nodes that are, or that onnxruntime's graph optimiser fuses into, a default-domain QLinearMatMul: the
    QLinearMatMul nodes, and the MatMuls whose two operands are DequantizeLinear outputs of 8-bit codes (those of
    the DequantizeLinear nodes in ``converted`` excepted: they are about to hold int4)."""
    found = []
    for graph in iterate_graphs(model):
        for node in graph:
            if is_op(node, "QLinearMatMul") or (
                    is_op(node, "MatMul") and all(_eight_bit_dequantized(value, converted) for value in node.inputs)):
                found.append(node.name or node.op_type)
    return found


def upgrade_refusal(model: ir.Model, converted: frozenset[ir.Node] = frozenset()) -> str | None:
    """Why ``model`` cannot be converted to opset 21 for int4 storage in the installed onnxruntime once the
    DequantizeLinear nodes ``converted`` hold int4 (None: it can, subject to the numerical check of the conversion
    itself)."""
    cap = runtime_opset_cap()
    if cap < MINIMUM_OPSET:
        return f"the installed onnxruntime runs opsets up to {cap}; int4 DequantizeLinear needs {MINIMUM_OPSET}"
    blocking = qlinear_matmul_nodes(model, converted)
    if blocking and not runtime_runs_qlinear_matmul_at_21():
        shown = ", ".join(blocking[:3]) + (", ..." if len(blocking) > 3 else "")
        return (f"the installed onnxruntime {runtime.installed_onnxruntime().version} has no QLinearMatMul kernel "
                f"at opset {MINIMUM_OPSET}, and {len(blocking)} node(s) would become one ({shown})")
    return None


#: onnxruntime's integer kernels and the input that holds their weight codes (none of them takes int4).
INTEGER_KERNEL_WEIGHT = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3, "ConvInteger": 1, "MatMulInteger": 1,
                         "MatMulIntegerToFloat": 1}


def _four_bit_integer_kernel_weights(model: ir.Model) -> dict[str, int]:
    """Per integer-kernel type, how many of its weights hold codes in the 4-bit range as int8 (widened)."""
    kept: dict[str, int] = {}
    for graph in iterate_graphs(model):
        for node in graph:
            index = INTEGER_KERNEL_WEIGHT.get(node.op_type)
            if index is None or node.domain not in ("", "ai.onnx", "com.microsoft") or len(node.inputs) <= index:
                continue
            codes = constant_array(node.inputs[index])
            if codes is not None and codes.dtype == np.int8 and codes.size and -8 <= codes.min() <= codes.max() <= 7:
                kept[node.op_type] = kept.get(node.op_type, 0) + 1
    return kept


@register
class StoreInt4Weights(RewritePass):
    """Store the 4-bit codes of constant weights behind DequantizeLinear as int4/uint4 (upgrading to opset 21)."""

    phase = Phase.LOWER
    summary = "4-bit weight codes stored as int8 behind DequantizeLinear become int4/uint4 (opset 21, exact)"

    def call(self, model: ir.Model) -> PassResult:
        context = RewriteContext(model)
        kept = _four_bit_integer_kernel_weights(model)
        for op_type, count in sorted(kept.items()):
            logger.info("%d 4-bit weights stay int8 codes inside %s (onnxruntime has no int4 integer kernel)",
                        count, op_type)
        candidates = [node for graph in iterate_graphs(model) for node in graph
                      if (plan := self._candidate(node, context)) is not None and not isinstance(plan, Refusal)]
        if not candidates:
            return PassResult(model, False)
        computing = sorted({consumer.op_type for node in candidates for consumer in node.outputs[0].consumers()
                            if consumer.op_type in FLOAT_COMPUTE_OPS})
        current = default_opset(model)
        if current < MINIMUM_OPSET:
            reason = upgrade_refusal(model, frozenset(candidates))
            upgraded = None if reason is not None else upgrade_opset(model, MINIMUM_OPSET)
            if upgraded is None:
                logger.warning("%d 4-bit weights stay int8 codes (opset %d): %s", len(candidates), current,
                               reason or f"the conversion to opset {MINIMUM_OPSET} was refused (logged above)")
                return PassResult(model, False)
            adopt(model, upgraded)
            logger.info("model upgraded from opset %d to %d for int4 weights", current, MINIMUM_OPSET)
        result = super().call(model)
        logger.info("stored %d 4-bit weights as int4", len(candidates))
        if computing:
            logger.warning("onnxruntime has no int4 integer kernel: it runs int4 DequantizeLinear -> float %s "
                           "(smaller than int8 codes, slower to run; docs/runtime-facts.md)", "/".join(computing))
        return result

    def _candidate(self, node: ir.Node, context: RewriteContext) -> _Plan | Refusal | None:
        match = self.match(node, context)
        if match is None:
            return None
        return self._plan(match)

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not is_op(node, "DequantizeLinear") or _codes_value(node) is None:
            return None
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> _Plan | Refusal:
        if default_opset(context.model) < MINIMUM_OPSET:
            return Refusal(f"int4 DequantizeLinear needs opset {MINIMUM_OPSET}, the model has "
                           f"{default_opset(context.model)}")
        return self._plan(node)

    def _plan(self, node: ir.Node) -> _Plan | Refusal:
        codes_value = _codes_value(node)
        assert codes_value is not None  # matched
        storage, lowest, highest = _FOUR_BIT[codes_value.dtype]
        codes = constant_array(codes_value)
        zero_value = node.inputs[2] if len(node.inputs) > 2 else None
        zero = None
        if zero_value is not None:
            zero = constant_array(zero_value)
            if zero is None:
                return Refusal(f"the zero point {zero_value.name!r} is not a constant")
        for role, array in (("codes", codes), ("zero points", zero)):
            if array is not None and array.size and (array.min() < lowest or array.max() > highest):
                return Refusal(f"{role} span [{array.min()}, {array.max()}], beyond the 4-bit range "
                               f"[{lowest}, {highest}] (an 8-bit weight)")
        return _Plan(node, codes.astype(storage), None if zero is None else zero.astype(storage))

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        node, graph = plan.dequantize, plan.dequantize.graph
        old = [node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None]
        base = old[0].name or node.name or "weight"
        node.replace_input_with(0, new_initializer(graph, context.names, f"{base}_int4", plan.codes))
        if plan.zero_point is not None:
            node.replace_input_with(2, new_initializer(graph, context.names, f"{base}_zero_point_int4",
                                                       plan.zero_point))
        drop_unused_initializers(old)
        logger.debug("%s: %s stored as %s", node.name, base, node.inputs[0].dtype)


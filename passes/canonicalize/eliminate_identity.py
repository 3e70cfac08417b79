"""EliminateIdentity: remove nodes whose first output always equals their first input.

What counts as a no-op (node ``y = op(x, ...)`` with ``y == x`` element for element, same type and shape):

- ``Identity(x)``: by definition (tensors, sequences and optionals alike);
- ``Dropout(x, ...)`` in inference mode: ``y = x`` when not training. Inference mode means: opset ≤ 6 with
  ``is_test=1`` (its default is training); opset 7–11 always (no training switch, and runtimes run it as a copy);
  opset ≥ 12 with no ``training_mode`` input or one that is a constant initializer equal to false (a graph input
  could switch training on). The ``mask`` output must be unused, since removing the node removes it;
- ``Cast(x, to=T)`` when the element type of ``x`` is known to be ``T`` already;
- ``Reshape(x, s)`` when ``x`` has a fully static shape and the constant ``s`` resolves to that same shape
  (``0`` copies the input dimension unless ``allowzero=1``, one ``-1`` is inferred from the element count).

``Expand`` and ``Squeeze``/``Unsqueeze`` are not no-ops in general (they can broadcast or change rank) and are left
to constant folding.

How: every reader of ``y`` reads ``x`` instead (``Value.replace_all_uses_with``; a node in an If/Loop/Scan body that
captures ``y`` from the enclosing graph is a reader of the same value object, so it is rewired too) and the node is
removed. When ``y`` is a graph output its *name* is part of the model's interface, so ``x`` takes that name and
becomes the graph output; this is only safe when ``x`` is produced by a node of the same graph and is not itself a
graph input, initializer or graph output (renaming those would change the interface, and one value cannot be two
graph outputs). Otherwise the node stays, and the reason is logged.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.ir.values import DEFAULT_DOMAINS, constant_array, node_default_opset, static_shape
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _NoOp:
    node: ir.Node
    data: ir.Value
    output: ir.Value


def resolved_reshape(input_shape: tuple[int, ...], target: np.ndarray, *, allow_zero: bool) -> tuple[int, ...] | None:
    """The output shape of ``Reshape`` for a static input shape and constant target, or ``None`` if invalid."""
    dimensions: list[int] = []
    for axis, size in enumerate(int(size) for size in target.reshape(-1)):
        if size == 0 and not allow_zero:
            if axis >= len(input_shape):
                return None
            size = input_shape[axis]
        dimensions.append(size)
    if dimensions.count(-1) > 1:
        return None
    total = int(np.prod(input_shape, dtype=np.int64))
    if -1 in dimensions:
        known = int(np.prod([size for size in dimensions if size != -1], dtype=np.int64))
        if known == 0 or total % known:
            return None
        dimensions[dimensions.index(-1)] = total // known
    return tuple(dimensions)


@register
class EliminateIdentity(RewritePass):
    """Remove Identity nodes and no-op Dropout / Cast / Reshape nodes."""

    phase = Phase.CANONICALIZE
    summary = "remove Identity and no-op Dropout (inference), Cast (same type) and Reshape (same static shape)"

    def match(self, node: ir.Node, context: RewriteContext) -> _NoOp | None:
        if node.domain not in DEFAULT_DOMAINS or not node.inputs or not node.outputs:
            return None
        data = node.inputs[0]
        if data is None:
            return None
        if node.op_type == "Identity":
            is_no_op = True
        elif node.op_type == "Dropout":
            is_no_op = self._is_inference_dropout(node, context.model)
        elif node.op_type == "Cast":
            is_no_op = self._is_same_type_cast(node, data)
        elif node.op_type == "Reshape":
            is_no_op = self._is_same_shape_reshape(node, data)
        else:
            return None
        return _NoOp(node, data, node.outputs[0]) if is_no_op else None

    def check(self, match: _NoOp, context: RewriteContext) -> _NoOp | Refusal:
        node, data, output = match.node, match.data, match.output
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                return Refusal(f"its output {extra.name!r} is read (removing the node would remove it)")
        if not output.is_graph_output():
            return match
        producer = data.producer()
        if data.is_graph_input() or data.is_initializer():
            return Refusal(
                f"{output.name!r} is a graph output and {data.name!r} is a graph input or initializer "
                "(renaming it would change the model's interface)"
            )
        if data.is_graph_output():
            return Refusal(
                f"both {data.name!r} and {output.name!r} are graph outputs (one value cannot be two outputs)"
            )
        if producer is None or producer.graph is not node.graph:
            return Refusal(f"{output.name!r} is a graph output and {data.name!r} is produced outside this graph")
        return match

    def rewrite(self, plan: _NoOp, context: RewriteContext) -> None:
        node, data, output = plan.node, plan.data, plan.output
        graph = node.graph
        if output.is_graph_output():
            name = output.name
            if data.type is None:
                data.type = output.type
            if data.shape is None and output.shape is not None:
                data.shape = output.shape
            output.replace_all_uses_with(data, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            output.name = None
            data.name = name
        else:
            output.replace_all_uses_with(data)
            graph.remove(node, safe=True)
        logger.debug("%s: removed %s (%s)", self.pass_name(), node.name, node.op_type)

    @staticmethod
    def _is_inference_dropout(node: ir.Node, model: ir.Model) -> bool:
        version = node_default_opset(node, model)
        if version == 0:  # no default-domain import: not a Dropout whose semantics are known
            return False
        if version < 7:
            is_test = node.attributes.get("is_test")
            return is_test is not None and not is_test.is_ref() and is_test.as_int() != 0
        if version < 12:
            return True
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return True
        training_mode = constant_array(node.inputs[2])
        return training_mode is not None and training_mode.size == 1 and not bool(training_mode.reshape(-1)[0])

    @staticmethod
    def _is_same_type_cast(node: ir.Node, data: ir.Value) -> bool:
        target = node.attributes.get("to")
        if target is None or target.is_ref():
            return False
        dtype = data.const_value.dtype if data.const_value is not None else data.dtype
        return dtype is not None and int(dtype) == target.as_int()

    @staticmethod
    def _is_same_shape_reshape(node: ir.Node, data: ir.Value) -> bool:
        if len(node.inputs) < 2:
            return False
        target = constant_array(node.inputs[1])
        input_shape = static_shape(data)
        if target is None or input_shape is None or target.ndim != 1:
            return False
        allow_zero = node.attributes.get("allowzero")
        allow_zero_flag = allow_zero is not None and not allow_zero.is_ref() and allow_zero.as_int() != 0
        return resolved_reshape(input_shape, target, allow_zero=allow_zero_flag) == input_shape

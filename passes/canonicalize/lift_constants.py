"""LiftConstants: every ``Constant`` node of a graph becomes an initializer of that graph, under the same name.

What: a node ``y = Constant<attr>()`` is replaced by an initializer named ``y`` holding the tensor the attribute
describes::

    value=T               -> T (its element type and shape)
    value_float=f         -> float32 scalar f          value_floats=[f...]   -> float32 1-D [f...]
    value_int=i           -> int64 scalar i            value_ints=[i...]     -> int64 1-D [i...]
    value_string=s        -> string scalar s           value_strings=[s...]  -> string 1-D [s...]

The operator's semantics are exactly "output = that tensor", so the model computes the same thing; every reader of
``y`` (a node, a subgraph that captures ``y`` by name, or a graph output) now reads the initializer instead.

Why: the rewrites of the canonical pipeline recognise constants as initializers only (one representation, one
check); exporters such as Paddle keep every weight in a Constant node, so without this pass nothing would fold.

Where the initializer goes: into the graph that owns the Constant node, so a Constant inside an If/Loop/Scan body
becomes an initializer of that body (visible only there, as the node's output was). Functions cannot hold
initializers, so Constant nodes inside functions are left as they are.

Refused (logged, node kept): ``sparse_value`` (a sparse initializer would change how the tensor is stored and few
consumers handle it), an attribute that refers to a function attribute, a malformed node (not exactly one
attribute, not exactly one named output), or a name already taken by another initializer of the graph.

Cost: one walk over the nodes, then per graph one batched removal of the lifted nodes; tensors are not copied (the
attribute's tensor object, possibly memory-mapped external data, becomes the initializer's value), so models with
thousands of Constant nodes lift in linear time.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from qgraph.ir.values import is_op
from qgraph.passes.infrastructure import Phase, QGraphPass, register

logger = logging.getLogger(__name__)


def constant_tensor(node: ir.Node) -> tuple[ir.TensorProtocol | None, str | None]:
    """The tensor a ``Constant`` node produces, or ``None`` and the reason it cannot be lifted."""
    if len(node.attributes) != 1:
        return None, f"it has {len(node.attributes)} attributes instead of exactly one"
    if len(node.outputs) != 1 or not node.outputs[0].name:
        return None, "it does not have exactly one named output"
    attribute_name, attribute = next(iter(node.attributes.items()))
    if attribute.is_ref():
        return None, f"its attribute {attribute_name!r} refers to a function attribute"
    name = node.outputs[0].name
    if attribute_name == "value":
        return attribute.as_tensor(), None
    if attribute_name == "value_float":
        return ir.tensor(attribute.as_float(), dtype=ir.DataType.FLOAT, name=name), None
    if attribute_name == "value_floats":
        return ir.tensor(list(attribute.as_floats()), dtype=ir.DataType.FLOAT, name=name), None
    if attribute_name == "value_int":
        return ir.tensor(attribute.as_int(), dtype=ir.DataType.INT64, name=name), None
    if attribute_name == "value_ints":
        return ir.tensor(list(attribute.as_ints()), dtype=ir.DataType.INT64, name=name), None
    if attribute_name == "value_string":
        return ir.StringTensor(np.array(_as_bytes(attribute.as_string()), dtype=np.bytes_), name=name), None
    if attribute_name == "value_strings":
        strings = [_as_bytes(text) for text in attribute.as_strings()]
        return ir.StringTensor(np.array(strings, dtype=np.bytes_).reshape(len(strings)), name=name), None
    if attribute_name == "sparse_value":
        return None, "it holds a sparse tensor (sparse_value); sparse initializers are not produced"
    return None, f"its attribute {attribute_name!r} is not one the Constant operator defines"


def _as_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


@register
class LiftConstants(QGraphPass):
    """Turn every Constant node into an initializer of the graph that owns it (functions excepted)."""

    phase = Phase.CANONICALIZE
    summary = "Constant nodes become initializers of their graph (main graph and subgraphs)"

    def call(self, model: ir.Model) -> PassResult:
        lifted = 0
        for graph in list(model.graphs()):
            lifted += self._lift_graph(graph)
        for function in model.functions.values():
            kept = sum(1 for node in function.all_nodes() if is_op(node, "Constant"))
            if kept:
                logger.debug(
                    "%s: function %s keeps its %d Constant node(s): functions cannot hold initializers",
                    self.pass_name(), function.name, kept,
                )
        if lifted:
            logger.debug("%s: lifted %d Constant node(s)", self.pass_name(), lifted)
        return PassResult(model, lifted > 0)

    def _lift_graph(self, graph: ir.Graph) -> int:
        removed: list[ir.Node] = []
        new_initializers: list[ir.Value] = []
        taken = set(graph.initializers)
        for node in graph:
            if not is_op(node, "Constant"):
                continue
            tensor, reason = constant_tensor(node)
            if tensor is None:
                logger.info("%s: leaving %s (Constant): %s", self.pass_name(), node.name, reason)
                continue
            output = node.outputs[0]
            if output.name in taken:
                logger.info(
                    "%s: leaving %s (Constant): the name %r is already an initializer of the graph",
                    self.pass_name(), node.name, output.name,
                )
                continue
            initializer = ir.Value(
                name=output.name,
                shape=ir.Shape(tensor.shape),
                type=ir.TensorType(tensor.dtype),
                const_value=tensor,
                doc_string=output.doc_string,
                metadata_props=dict(output.metadata_props),
            )
            initializer.meta.update(output.meta)
            output.replace_all_uses_with(initializer, replace_graph_outputs=True)
            taken.add(output.name)
            removed.append(node)
            new_initializers.append(initializer)
        if removed:
            graph.remove(removed, safe=True)
            for initializer in new_initializers:
                graph.register_initializer(initializer)
        return len(removed)

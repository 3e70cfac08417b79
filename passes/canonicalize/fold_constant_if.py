"""FoldConstantIf: replace an ``If`` whose condition is a constant by the branch it always takes.

What: ``If(cond; then_branch, else_branch)`` with ``cond`` a one-element constant computes exactly the taken
branch, so

    outputs(If) = outputs(then_branch)  if bool(cond) else  outputs(else_branch)

and the If can be replaced by the taken branch's nodes, inlined into the graph that holds the If. A condition is
constant when it is an initializer that is not also an overridable graph input (after FoldConstants, and after
``--fix-input`` turned a control input such as ``sample_rate`` into a constant), or the output of a ``Constant``
node; a capture of an enclosing graph's constant counts too.

How, for the taken branch ``B`` of an If node ``N`` in graph ``G``:

1. every node of ``B`` moves, in order, into ``G`` just before ``N`` (branch nodes only read values that exist when
   ``N`` runs: outer values they capture, which stay the same objects, and each other's outputs), and every
   initializer of ``B`` becomes an initializer of ``G``; a node or value name already taken elsewhere in the model
   gets a fresh name (``name_1``…), since ONNX forbids a subgraph name to repeat an enclosing scope's;
2. each output of ``N`` is rewired to the corresponding output of ``B``. When ``N``'s output is an output of ``G``
   its name is part of ``G``'s interface: a value made inside the branch takes that name; a value the branch only
   passes through (a captured outer value, or one that ``B`` returns twice) is copied by an ``Identity`` under that
   name, which EliminateIdentity treats like any other;
3. ``N`` is removed together with the untaken branch, whose nodes first release their captures of outer values.

Nested Ifs fold too: the pass repeats until no If with a constant condition is left anywhere (main graph, bodies,
functions), so one run is a fixed point. Refused (reason logged, If kept): a condition that does not hold exactly
one element, or whose element type is not a number or bool; and a fold after which ONNX shape inference (strict)
rejects a model it accepted before. An If hides its branches' shapes from the rest of the graph, and some graphs
rely on that: ONNX's own AffineGrid function expansion feeds 1-element ``[1]`` tensors out of an If into ``Range``,
which requires scalars; onnxruntime tolerates it, the checker does not once the branch is inlined. So each fold is
tried first on a copy of the model and checked (``check_shapes=False`` skips this for very large models).

An If whose condition is not constant is left to the quantizer, which quantizes both branches (see
``qgraph.ir.subgraphs``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from qgraph.ir.edit import drop_unused_initializers, release_captures
from qgraph.ir.naming import NameScope, names_in_graph, names_in_model
from qgraph.ir.traversal import iterate_graphs
from qgraph.ir.values import constant_array, is_op
from qgraph.passes.infrastructure import Phase, QGraphPass, register

logger = logging.getLogger(__name__)


def constant_condition(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant If condition: a constant (:func:`~qgraph.ir.values.constant_array`), or the ``value``
    of the ``Constant`` node that produces it (inside a function, where Constant nodes stay)."""
    if value is None:
        return None
    array = constant_array(value)
    if array is not None:
        return array
    producer = value.producer()
    if is_op(producer, "Constant"):
        attribute = producer.attributes.get("value")
        if attribute is not None and not attribute.is_ref() and attribute.type == ir.AttributeType.TENSOR:
            return attribute.as_tensor().numpy()
    return None



@register
class FoldConstantIf(QGraphPass):
    """Inline the taken branch of an If whose condition is a constant."""

    phase = Phase.CANONICALIZE
    summary = "inline the taken branch of an If whose condition is constant (nested Ifs too)"

    def __init__(self, *, check_shapes: bool = True) -> None:
        super().__init__()
        self.check_shapes = check_shapes

    def call(self, model: ir.Model) -> PassResult:
        refused: set[int] = set()
        folded = 0
        accepted_before: bool | None = None
        while True:
            candidate = self._next_candidate(model, refused)
            if candidate is None:
                break
            node, taken = candidate
            if self.check_shapes:
                if accepted_before is None:
                    accepted_before = _shape_error(ir.serde.serialize_model(model)) is None
                error = self._trial(model, node, taken) if accepted_before else None
                if error is not None:
                    logger.info("%s: leaving %s (If): inlining its branch makes ONNX shape inference fail (%s)",
                                self.pass_name(), node.name, error)
                    refused.add(id(node))
                    continue
            self._inline(model, node, taken)
            folded += 1
        if folded:
            logger.debug("%s: folded %d If node(s)", self.pass_name(), folded)
        return PassResult(model, folded > 0)

    def _next_candidate(self, model: ir.Model, refused: set[int]) -> tuple[ir.Node, bool] | None:
        for graph in iterate_graphs(model):
            for node in graph:
                if not is_op(node, "If") or id(node) in refused:
                    continue
                condition = constant_condition(node.inputs[0] if node.inputs else None)
                if condition is None:
                    continue
                reason = None
                if condition.size != 1:
                    reason = f"its condition holds {condition.size} elements, not one"
                elif condition.dtype.kind not in "biuf":
                    reason = f"its condition has element type {condition.dtype}"
                elif not all(name in node.attributes for name in ("then_branch", "else_branch")):
                    reason = "a branch is missing"
                if reason is not None:
                    logger.info("%s: leaving %s (If): %s", self.pass_name(), node.name, reason)
                    refused.add(id(node))
                    continue
                return node, bool(condition.reshape(-1)[0])
        return None

    def _trial(self, model: ir.Model, node: ir.Node, taken: bool) -> str | None:
        """Fold the same If in a copy of the model; the shape-inference error that results, if any."""
        position = _position(model, node)
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        graphs = list(iterate_graphs(copy))
        twin = list(graphs[position[0]])[position[1]]
        self._inline(copy, twin, taken)
        return _shape_error(ir.serde.serialize_model(copy))

    def _inline(self, model: ir.Model, node: ir.Node, taken: bool) -> None:
        graph = node.graph
        branch = node.attributes["then_branch" if taken else "else_branch"].as_graph()
        untaken = node.attributes["else_branch" if taken else "then_branch"].as_graph()
        # Node and value names share one scope here. Names inside the two branches are free once the If is gone;
        # the If's output names stay reserved, since a graph output among them is handed to the value that
        # replaces it.
        freed = names_in_graph(branch, node_names=True) | names_in_graph(untaken, node_names=True)
        names = NameScope.of_names(names_in_model(model, node_names=True) - freed)
        names.reserve(value.name for value in node.outputs)

        branch_outputs = list(branch.outputs)
        branch.outputs.clear()
        for name, initializer in list(branch.initializers.items()):
            branch.initializers.pop(name)
            initializer.name = names.fresh(initializer.name)
            graph.register_initializer(initializer)
        for inner in list(branch):
            branch.remove(inner)
            if inner.name:
                inner.name = names.fresh(inner.name)
            for output in inner.outputs:
                if output.name:
                    output.name = names.fresh(output.name)
            graph.insert_before(node, inner)

        renamed: set[int] = set()
        for if_output, branch_output in zip(node.outputs, branch_outputs):
            if branch_output.type is None:
                branch_output.type = if_output.type
            if branch_output.shape is None:
                branch_output.shape = if_output.shape
            if if_output.is_graph_output():
                producer = branch_output.producer()
                made_here = producer is not None and producer.graph is graph and not branch_output.is_graph_output()
                if not made_here or id(branch_output) in renamed:
                    # A captured value or an initializer keeps its own name: copy it under the interface name.
                    copy = ir.node("Identity", [branch_output], name=names.fresh(f"{if_output.name}_Identity"))
                    copy.outputs[0].type, copy.outputs[0].shape = branch_output.type, branch_output.shape
                    graph.insert_before(node, copy)
                    branch_output = copy.outputs[0]
                interface_name = if_output.name
                if_output.name = None
                branch_output.name = interface_name
                renamed.add(id(branch_output))
            if_output.replace_all_uses_with(branch_output, replace_graph_outputs=True)
        release_captures(untaken)
        condition = node.inputs[0]
        graph.remove(node, safe=True)
        drop_unused_initializers([condition])
        logger.debug("%s: inlined the %s branch of %s", self.pass_name(), "then" if taken else "else", node.name)


def _position(model: ir.Model, node: ir.Node) -> tuple[int, int]:
    for graph_index, graph in enumerate(iterate_graphs(model)):
        for node_index, candidate in enumerate(graph):
            if candidate is node:
                return graph_index, node_index
    raise ValueError(f"node {node.name} is not in the model")


def _shape_error(proto) -> str | None:
    """The first line of strict ONNX shape inference's complaint about ``proto``, or None when it accepts it."""
    import onnx.shape_inference

    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as error:  # onnx raises InferenceError and assorted checker errors
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return None

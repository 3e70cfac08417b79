"""EliminateDeadCode: remove the nodes and initializers whose results nobody reads.

What: a value is *live* when it is a graph output, or is read by a live node — in the same graph or in an
If/Loop/Scan body that captures it from an enclosing graph (onnx-ir records such a capture as a use of the same
value object). A node is dead when none of its outputs is live; removing it cannot change any graph output, because
ONNX operators are pure functions of their inputs. An initializer is dead when nothing reads it and it is neither
a graph input (part of the interface: a caller may feed it) nor a graph output.

How: each graph is walked once in reverse topological order. When a node is reached, every reader of its outputs
in that graph (later in the order) and in the bodies of later nodes has already been visited, so "no remaining
use" is final and one walk removes whole dead chains. The body of a live node is processed when the walk reaches
that node (before the nodes that come earlier), so a dead node inside a body releases its captures first; a dead
node that owns bodies releases every capture of every nested node before it is removed. Should a graph not be in
topological order, the walk repeats until nothing more is removed. Then unread initializers are removed from every
graph, subgraphs included. Functions are cleaned the same way (their outputs are their interface).

Side effects: standard ONNX has no operator with side effects, and neither do the operator sets qgraph knows to be
pure (``ai.onnx.ml``, ``com.microsoft``, ``ai.onnx.preview.training``). A node of any other domain may be a
custom operator whose effect is the point (logging, writing a file, a collective), so by default it is kept even
when its outputs are unread — unless it calls a function of the model whose body is itself pure. Extra domains can
be declared pure with ``pure_domains``. Unused opset imports are left as they are (harmless).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx_ir as ir
from onnx_ir.passes import PassResult

from qgraph.ir.edit import drop_unused_initializers, release_captures
from qgraph.ir.traversal import node_subgraphs
from qgraph.passes.infrastructure import Phase, QGraphPass, register

logger = logging.getLogger(__name__)

#: Operator domains without side effects.
PURE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})


@register
class EliminateDeadCode(QGraphPass):
    """Remove nodes none of whose outputs is read, and initializers nothing reads (in subgraphs too)."""

    phase = Phase.CANONICALIZE
    summary = "remove nodes whose outputs nobody reads and unread initializers (subgraphs and functions too)"

    def __init__(self, *, pure_domains: Iterable[str] = ()) -> None:
        super().__init__()
        self.pure_domains = PURE_DOMAINS | frozenset(pure_domains)

    def call(self, model: ir.Model) -> PassResult:
        self._pure_functions = self._pure_function_identifiers(model)
        removed_nodes = self._clean_graph(model.graph)
        for function in model.functions.values():
            removed_nodes += self._clean_graph(function)
        removed_initializers = 0
        for graph in model.graphs():
            removed_initializers += drop_unused_initializers(graph.initializers.values())
        if removed_nodes or removed_initializers:
            logger.debug(
                "%s: removed %d node(s) and %d initializer(s)", self.pass_name(), removed_nodes, removed_initializers
            )
        return PassResult(model, bool(removed_nodes or removed_initializers))

    def is_removable(self, node: ir.Node) -> bool:
        """Whether ``node`` may be removed once its outputs are unread (no side effects)."""
        return node.domain in self.pure_domains or node.op_identifier() in self._pure_functions

    def _clean_graph(self, graph: ir.Graph | ir.Function) -> int:
        removed = 0
        ordered = _is_topologically_ordered(graph)
        while True:
            removed_this_walk = 0
            for node in reversed(list(graph)):
                if self._is_dead(node):
                    if not self.is_removable(node):
                        logger.debug(
                            "%s: keeping %s (%s::%s): its domain may have side effects",
                            self.pass_name(), node.name, node.domain, node.op_type,
                        )
                        continue
                    for body in node_subgraphs(node):
                        release_captures(body)
                    graph.remove(node, safe=True)
                    removed_this_walk += 1
                else:
                    for subgraph in node_subgraphs(node):
                        removed_this_walk += self._clean_graph(subgraph)
            removed += removed_this_walk
            if not removed_this_walk or ordered:
                return removed

    @staticmethod
    def _is_dead(node: ir.Node) -> bool:
        return all(not output.uses() and not output.is_graph_output() for output in node.outputs)

    def _pure_function_identifiers(self, model: ir.Model) -> frozenset[ir.OperatorIdentifier]:
        """Functions of the model whose bodies (and the functions they call) only hold pure operators."""
        pure: set[ir.OperatorIdentifier] = set()
        changed = True
        while changed:  # a function calling another local function is pure once its callee is known to be
            changed = False
            for identifier, function in model.functions.items():
                if identifier in pure:
                    continue
                if all(
                    node.domain in self.pure_domains or node.op_identifier() in pure for node in function.all_nodes()
                ):
                    pure.add(identifier)
                    changed = True
        return frozenset(pure)


def _is_topologically_ordered(graph: ir.Graph | ir.Function) -> bool:
    """Whether every node of ``graph`` comes after the producers of its inputs that live in the same graph."""
    seen: set[int] = set()
    for node in graph:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.graph is node.graph and id(producer) not in seen:
                return False
        seen.add(id(node))
    return True

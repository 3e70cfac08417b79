"""Quantizing inside ``If`` branches: which graphs are quantized, and names made unique across sibling branches.

An If whose condition is known at compile time is gone before quantization (FoldConstantIf, ``--fix-input``). One
whose condition depends on the data stays, and both of its branches are quantized like the main graph:

- **annotate** runs once per graph — the main graph, then every If branch, recursively — and merges the results into
  one plan. This works because every tensor name is unique in the model (ONNX forbids a subgraph to reuse a name of
  an enclosing scope; names shared by *sibling* branches, which ONNX allows, are made unique first by
  :func:`make_names_unique`). A branch output stays float like a graph output; a value a branch captures from an
  enclosing graph is quantized where it is defined, so every reader, inside or outside the branch, sees the same
  dequantized value.
- **calibrate** cannot ask onnxruntime for a tensor inside a branch. Two ways exist: thread each branch tensor out
  through extra If outputs (the other branch must then produce a same-typed dummy, and the observer must be told
  which batches really took the branch; nested Ifs multiply the plumbing and change the model that is measured), or
  run each branch as a *standalone model* whose inputs are the values it captures. qgraph does the second: the main
  probe model also returns each If's condition and the values its branches capture; per batch, a branch's model
  runs only when the condition selected it, fed with exactly the values that reached the If. So a branch's ranges
  come from the batches that took it and from nothing else, nested Ifs recurse the same way, and memory stays one
  batch of activations. The price is one extra onnxruntime run per taken branch per batch (the branch is computed
  twice), and a branch that no calibration batch takes gets no ranges: its activations then stay float (only
  its weights are stored in int8), and calibration logs a warning naming the tensors.
- **insert Q/DQ and lower** visit the same graphs; the lowering passes already rewrite every graph.

Loop and Scan bodies are not quantized (their values change per iteration and a standalone run would need the loop
state): they stay FP32 and the plan says why.

An If's branches, the values a graph defines and the values a branch captures are walks of the graph, answered in
:mod:`qgraph.ir.traversal`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import onnx_ir as ir

from qgraph.ir.naming import NameScope
from qgraph.ir.traversal import branches, node_subgraphs
from qgraph.ir.values import is_op

logger = logging.getLogger(__name__)

LOOP_OPERATORS = frozenset({"Loop", "Scan"})


def quantized_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """``graph`` and every If branch inside it, recursively (parents before their branches)."""
    yield graph
    for node in graph:
        if is_op(node, "If"):
            for _, branch in branches(node):
                yield from quantized_graphs(branch)


def make_names_unique(model: ir.Model) -> int:
    """Rename values and nodes of subgraphs whose names repeat a name seen earlier (sibling branches may share
    names; the plan and the observers key tensors by name). Main-graph names never change. Returns the count.

    Graphs are visited main graph first, then each body after the graph holding it; a repeated name becomes the
    :class:`~qgraph.ir.naming.NameScope` fresh name of the names seen so far (values and nodes have a scope each).
    """
    value_names = NameScope()
    node_names = NameScope()
    renamed = 0

    def visit(graph: ir.Graph, is_main: bool) -> None:
        nonlocal renamed
        own = list(graph.inputs) + [value for node in graph for value in node.outputs]
        for value in own:
            if not value.name:
                continue
            if value.name in value_names and not is_main:
                value.name = value_names.fresh(value.name)
                renamed += 1
            value_names.reserve([value.name])
        for name, value in list(graph.initializers.items()):
            if name in value_names and not is_main:
                graph.initializers.pop(name)
                value.name = value_names.fresh(name)
                graph.register_initializer(value)
                renamed += 1
            value_names.reserve([value.name])
        for node in graph:
            if node.name:
                if node.name in node_names and not is_main:
                    node.name = node_names.fresh(node.name)
                    renamed += 1
                node_names.reserve([node.name])
        for node in graph:
            for nested in node_subgraphs(node):
                visit(nested, False)

    visit(model.graph, True)
    if renamed:
        logger.info("renamed %d subgraph value(s)/node(s) that repeated a name used elsewhere in the model", renamed)
    return renamed


def loop_reason(node: ir.Node) -> str:
    return f"{node.op_type} bodies stay FP32 (calibration does not reach inside loop iterations)"

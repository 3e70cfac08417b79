"""Quantizing inside ``If`` branches: which graphs are quantized, what a branch captures, unique names.

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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import onnx_ir as ir

from qgraph.ir.traversal import node_subgraphs

logger = logging.getLogger(__name__)

BRANCH_ATTRIBUTES = ("then_branch", "else_branch")
LOOP_OPERATORS = frozenset({"Loop", "Scan"})


def is_if(node: ir.Node) -> bool:
    return node.op_type == "If" and node.domain in ("", "ai.onnx")


def branches(node: ir.Node) -> Iterator[tuple[str, ir.Graph]]:
    """The (attribute name, graph) of each branch of an If node."""
    for name in BRANCH_ATTRIBUTES:
        attribute = node.attributes.get(name)
        if attribute is not None and not attribute.is_ref() and attribute.type == ir.AttributeType.GRAPH:
            yield name, attribute.as_graph()


def quantized_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """``graph`` and every If branch inside it, recursively (parents before their branches)."""
    yield graph
    for node in graph:
        if is_if(node):
            for _, branch in branches(node):
                yield from quantized_graphs(branch)



def _defined_in(graph: ir.Graph, defined: set[int]) -> None:
    for value in graph.inputs:
        defined.add(id(value))
    for value in graph.initializers.values():
        defined.add(id(value))
    for node in graph:
        for value in node.outputs:
            defined.add(id(value))
        for nested in node_subgraphs(node):
            _defined_in(nested, defined)


def captured_values(graph: ir.Graph) -> list[ir.Value]:
    """Values read inside ``graph`` (nested bodies included) but defined in an enclosing graph, in first-use order.

    Branch outputs that are captured values directly count too.
    """
    defined: set[int] = set()
    _defined_in(graph, defined)
    captured: dict[int, ir.Value] = {}

    def visit(current: ir.Graph) -> None:
        for node in current:
            for value in node.inputs:
                if value is not None and id(value) not in defined:
                    captured.setdefault(id(value), value)
            for nested in node_subgraphs(node):
                visit(nested)
        for value in current.outputs:
            if id(value) not in defined:
                captured.setdefault(id(value), value)

    visit(graph)
    return list(captured.values())


def defined_names(graph: ir.Graph) -> set[str]:
    """Names of the values ``graph`` itself defines: its inputs and its nodes' outputs (not nested bodies)."""
    names = {value.name for value in graph.inputs if value.name}
    for node in graph:
        names.update(value.name for value in node.outputs if value.name)
    return names


def make_names_unique(model: ir.Model) -> int:
    """Rename values and nodes of subgraphs whose names repeat a name seen earlier (sibling branches may share
    names; the plan and the observers key tensors by name). Main-graph names never change. Returns the count."""
    value_names: set[str] = set()
    node_names: set[str] = set()
    renamed = 0

    def fresh(base: str, taken: set[str]) -> str:
        name, counter = base, 1
        while name in taken:
            name, counter = f"{base}_{counter}", counter + 1
        return name

    def visit(graph: ir.Graph, is_main: bool) -> None:
        nonlocal renamed
        own = list(graph.inputs) + [value for node in graph for value in node.outputs]
        for value in own:
            if not value.name:
                continue
            if value.name in value_names and not is_main:
                value.name = fresh(value.name, value_names)
                renamed += 1
            value_names.add(value.name)
        for name, value in list(graph.initializers.items()):
            if name in value_names and not is_main:
                graph.initializers.pop(name)
                value.name = fresh(name, value_names)
                graph.register_initializer(value)
                renamed += 1
            value_names.add(value.name)
        for node in graph:
            if node.name:
                if node.name in node_names and not is_main:
                    node.name = fresh(node.name, node_names)
                    renamed += 1
                node_names.add(node.name)
        for node in graph:
            for nested in node_subgraphs(node):
                visit(nested, False)

    visit(model.graph, True)
    if renamed:
        logger.info("renamed %d subgraph value(s)/node(s) that repeated a name used elsewhere in the model", renamed)
    return renamed


def loop_reason(node: ir.Node) -> str:
    return f"{node.op_type} bodies stay FP32 (calibration does not reach inside loop iterations)"

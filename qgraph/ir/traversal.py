"""Walking a model's graphs: the main graph, every If/Loop/Scan body (recursively) and every function.

Passes, calibration and the summary all visit "every graph of the model" and ask for a node's bodies, an If's
branches, the values a graph defines or the values a body captures from enclosing graphs; this is the one place that
says what those are.

A body *captures* a value when a node inside it (or inside a body nested in it) reads a value that neither the body
nor a body nested in it defines (a graph defines its inputs, its initializers and its nodes' outputs); onnx-ir
represents the capture as a use of the outer value object itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

#: The attributes that hold an If's two branches.
BRANCH_ATTRIBUTES = ("then_branch", "else_branch")


def node_subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    """The bodies held by ``node``'s attributes (If branches, Loop/Scan bodies); reference attributes have none."""
    for attribute in node.attributes.values():
        if attribute.is_ref():
            continue
        if attribute.type == ir.AttributeType.GRAPH:
            yield attribute.as_graph()
        elif attribute.type == ir.AttributeType.GRAPHS:
            yield from attribute.as_graphs()


def iterate_graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, every subgraph (recursively) and every function of ``model``."""
    yield from model.graphs()
    for function in model.functions.values():
        yield function
        for node in function.all_nodes():
            yield from node_subgraphs(node)


def branches(node: ir.Node) -> Iterator[tuple[str, ir.Graph]]:
    """The (attribute name, graph) of each branch of an If node, then branch first."""
    for name in BRANCH_ATTRIBUTES:
        attribute = node.attributes.get(name)
        if attribute is not None and not attribute.is_ref() and attribute.type == ir.AttributeType.GRAPH:
            yield name, attribute.as_graph()


def defined_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """The named values ``graph`` itself defines, by name: its inputs, initializers and node outputs (no bodies)."""
    values: dict[str, ir.Value] = {value.name: value for value in graph.inputs if value.name}
    values.update(graph.initializers)
    for node in graph:
        values.update((value.name, value) for value in node.outputs if value.name)
    return values


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
    """The values ``graph`` captures (see the module docstring), in first-use order.

    A body output that is a captured value directly counts too.
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

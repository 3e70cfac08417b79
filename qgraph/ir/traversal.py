"""Walking a model's graphs: the main graph, every If/Loop/Scan body (recursively) and every function.

Passes, calibration and the summary all visit "every graph of the model" and ask for a node's bodies; this is the one
place that says what those are.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir


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

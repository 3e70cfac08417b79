"""Read-only networkx views of an onnx-ir graph, built on demand for analyses that networkx already solves.

:func:`dataflow_graph` turns one graph's nodes into a :class:`networkx.DiGraph`: a vertex per node, an edge from the
node producing a value to each node of the same graph consuming it, carrying the value as the ``value`` attribute
(and every value that links the two nodes as ``values``). A value read by a node inside a subgraph (an If/Loop body)
makes an edge to the node in this graph that owns the subgraph.

The view is a snapshot: it is never updated when the graph changes. Build a fresh one after every mutation, and
never keep it beside the graph as a second source of truth.

Helpers on top of it: :func:`is_topologically_sorted` (does the graph's node order respect the data flow),
:func:`dominators` (immediate dominators from an entry node) and :func:`connected_groups` (weakly connected
components of the edges a predicate keeps: for instance the tensors that must share one quantization scale).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import networkx as nx
import onnx_ir as ir

from qgraph.ir.traversal import node_subgraphs

logger = logging.getLogger(__name__)

#: ``predicate(producer, consumer, value)`` for :func:`connected_groups`.
EdgePredicate = Callable[[ir.Node, ir.Node, ir.Value], bool]


def _subgraph_consumers(node: ir.Node) -> list[tuple[ir.Node, ir.Value]]:
    """(inner node, outer value) for every value that a node inside ``node``'s subgraphs reads from outside them."""
    found: list[tuple[ir.Node, ir.Value]] = []
    for subgraph in node_subgraphs(node):
        local = set(subgraph.inputs) | set(subgraph.initializers.values())
        for inner in subgraph.all_nodes():
            local.update(inner.outputs)
        for inner in subgraph.all_nodes():
            for value in inner.inputs:
                if value is not None and value not in local:
                    found.append((inner, value))
    return found


def dataflow_graph(graph: ir.Graph | ir.Function) -> nx.DiGraph:
    """A fresh DiGraph of ``graph``'s nodes; an edge per producer → consumer, attributes ``value`` and ``values``.

    Each vertex also carries ``index``, its position in the graph's node order.
    """
    view = nx.DiGraph()
    nodes = list(graph)
    for index, node in enumerate(nodes):
        view.add_node(node, index=index)

    def link(producer: ir.Node, consumer: ir.Node, value: ir.Value) -> None:
        if view.has_edge(producer, consumer):
            values = view.edges[producer, consumer]["values"]
            if value not in values:
                view.edges[producer, consumer]["values"] = (*values, value)
        else:
            view.add_edge(producer, consumer, value=value, values=(value,))

    for consumer in nodes:
        for value in consumer.inputs:
            producer = value.producer() if value is not None else None
            if value is not None and producer is not None and producer in view:
                link(producer, consumer, value)
        for _, value in _subgraph_consumers(consumer):
            producer = value.producer()
            if producer is not None and producer in view and producer is not consumer:
                link(producer, consumer, value)
    return view


def is_topologically_sorted(graph: ir.Graph | ir.Function) -> bool:
    """Whether every node of ``graph`` comes after the nodes producing its inputs."""
    view = dataflow_graph(graph)
    return all(view.nodes[producer]["index"] < view.nodes[consumer]["index"] for producer, consumer in view.edges)


def dominators(graph: ir.Graph | ir.Function, entry: ir.Node) -> dict[ir.Node, ir.Node]:
    """Immediate dominator of every node reachable from ``entry`` in the data flow (``entry`` maps to itself)."""
    view = dataflow_graph(graph)
    if entry not in view:
        raise ValueError(f"node {entry.name!r} is not in graph {graph.name!r}")
    result = dict(nx.immediate_dominators(view, entry))
    result[entry] = entry  # networkx >= 3.5 leaves the entry out; keep one convention
    return result


def connected_groups(graph: ir.Graph | ir.Function, predicate: EdgePredicate) -> list[list[ir.Node]]:
    """Weakly connected components of the subgraph induced by the edges for which ``predicate`` is true.

    Only nodes touched by a kept edge appear. Each group lists its nodes in graph order; groups are ordered by their
    first node.
    """
    view = dataflow_graph(graph)
    kept = nx.DiGraph()
    for producer, consumer, data in view.edges(data=True):
        if any(predicate(producer, consumer, value) for value in data["values"]):
            kept.add_edge(producer, consumer)
    groups = [
        sorted(component, key=lambda node: view.nodes[node]["index"])
        for component in nx.weakly_connected_components(kept)
    ]
    return sorted(groups, key=lambda group: view.nodes[group[0]]["index"])

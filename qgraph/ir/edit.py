"""Small edits of the in-memory graph that several builders make, each written once.

- :func:`new_initializer`: new data always goes into a *new* initializer under a fresh model-wide name
  (:mod:`qgraph.ir.naming`), never into an existing tensor, which another node may share;
- :func:`drop_unused_initializers`: an initializer that nothing reads any more is removed, unless it is a graph
  input (part of the interface: a caller may feed it) or a graph output;
- :func:`release_captures`: before a body (an If branch, a Loop body) is thrown away, its nodes let go of the outer
  values they read, so that those values no longer count the dead body's nodes among their uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from qgraph.ir.naming import NameScope
from qgraph.ir.traversal import node_subgraphs

logger = logging.getLogger(__name__)


def new_initializer(graph: ir.Graph, names: NameScope, base_name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` under a fresh name derived from ``base_name``."""
    name = names.fresh(base_name)
    # np.ascontiguousarray would turn a 0-d array into shape (1,); asarray keeps scalars scalar.
    array = np.asarray(array, order="C")
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
    graph.register_initializer(value)
    return value


def drop_unused_initializers(values: Iterable[ir.Value | None]) -> int:
    """Remove each of ``values`` that is an initializer no node reads and no graph input or output; the count.

    Other values (``None``, node outputs, values still read) are left alone, so a rewrite may pass every input it
    detached; to clean a whole graph, pass ``graph.initializers.values()``.
    """
    dropped = 0
    for value in list(values):
        if value is None or not value.is_initializer() or value.uses():
            continue
        if value.is_graph_input() or value.is_graph_output():
            continue
        graph, name = value.graph, value.name
        if graph is not None and name is not None and graph.initializers.get(name) is value:
            graph.initializers.pop(name)
            dropped += 1
            logger.debug("dropped initializer %s that no node reads any more", value.name)
    return dropped


def release_captures(graph: ir.Graph) -> None:
    """Detach every node of ``graph`` and of the bodies nested in it from its inputs (innermost, last node first)."""
    for node in reversed(list(graph)):
        for body in node_subgraphs(node):
            release_captures(body)
        for index in range(len(node.inputs)):
            if node.inputs[index] is not None:
                node.replace_input_with(index, None)


def take_over(old: ir.Value, new: ir.Value, names: NameScope | None = None) -> None:
    """Every reader of ``old`` (graph outputs included) reads ``new``, which inherits ``old``'s name and type.

    ``old`` is renamed out of the way: with a fresh name from ``names`` where one is given, else ``NAME__replaced``.
    """
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if new.type is None:
        new.type = old.type
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    if name:
        old.name = names.fresh(f"{name}_replaced") if names is not None else f"{name}__replaced"
        new.name = name

"""Fresh names for the values, initializers and nodes that qgraph writes into a model: one scheme for every builder.

The scheme: a name derived from ``base`` is ``base`` itself when nothing in the scope has it, else the first free
``base_1``, ``base_2``, ...; every name handed out joins the scope, so two requests never get the same name.

The scope is the whole model, not one graph: ONNX forbids a subgraph (an If/Loop/Scan body) from reusing a name of
an enclosing scope, and a name that repeats one inside a nested body would make that body invalid, so a name that is
free in the graph being edited may still be taken. :func:`names_in_model` collects the names every graph defines
(main graph, nested bodies, functions): graph inputs, initializers and node outputs. In a valid model every name a
node reads is one of those, and a name a body reads from an enclosing graph belongs to that graph, not to the body.
Node names are collected too when asked, for builders that draw node names and value names from one scope.
:class:`NameScope` can also start from any set of taken names, for builders that work on protobuf
(:func:`names_in_proto`) or that must treat some of the model's names as free (FoldConstantIf frees the names of the
branches it removes).

A scope built from a model collects its names on the first request, so a pass that builds one per rewrite pays for
the walk only when the rewrite really needs a name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import onnx
import onnx_ir as ir

from qgraph.ir.traversal import node_subgraphs


def names_in_graph(graph: ir.Graph | ir.Function, *, node_names: bool = False) -> set[str]:
    """The value names ``graph`` and every body nested in it define (see the module docstring)."""
    names: set[str] = set()

    def visit(current: ir.Graph | ir.Function) -> None:
        names.update(value.name for value in current.inputs if value.name)
        if isinstance(current, ir.Graph):
            names.update(current.initializers)
        for node in current:
            if node_names and node.name:
                names.add(node.name)
            names.update(value.name for value in node.outputs if value.name)
            for body in node_subgraphs(node):
                visit(body)

    visit(graph)
    return names


def names_in_model(model: ir.Model, *, node_names: bool = False) -> set[str]:
    """The value names (and node names when asked) of every graph and function of ``model``."""
    names = names_in_graph(model.graph, node_names=node_names)
    for function in model.functions.values():
        names |= names_in_graph(function, node_names=node_names)
    return names


def _proto_bodies(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
    """Every body held by ``nodes``' attributes, nested ones included."""
    for node in nodes:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
            if attribute.type == onnx.AttributeProto.GRAPHS:
                bodies = list(attribute.graphs)
            for body in bodies:
                yield body
                yield from _proto_bodies(body.node)


def names_in_proto(model: onnx.ModelProto, *, node_names: bool = False) -> set[str]:
    """:func:`names_in_model` for a protobuf model: every graph (nested bodies included) and every function."""
    names: set[str] = set()
    node_lists: list[Iterable[onnx.NodeProto]] = []
    for graph in [model.graph, *_proto_bodies(model.graph.node)]:
        names.update(value.name for value in graph.input)
        names.update(tensor.name for tensor in graph.initializer)
        node_lists.append(graph.node)
    for function in model.functions:
        names.update(function.input)
        node_lists.append(function.node)
        for body in _proto_bodies(function.node):
            names.update(value.name for value in body.input)
            names.update(tensor.name for tensor in body.initializer)
            node_lists.append(body.node)
    for nodes in node_lists:
        for node in nodes:
            names.update(node.output)
            if node_names:
                names.add(node.name)
    names.discard("")
    return names


class NameScope:
    """Taken names, and fresh names that join them (see the module docstring for the scheme).

    ``NameScope(model)`` holds every name of ``model`` (:func:`names_in_model`, node names too with ``node_names``),
    collected on the first request; ``NameScope()`` starts empty; :meth:`of_names` and :meth:`of_proto` start from
    a set of names or from a protobuf model.
    """

    def __init__(self, model: ir.Model | None = None, *, node_names: bool = False) -> None:
        self._taken: set[str] = set()
        self._collect: Callable[[], set[str]] | None = None
        if model is not None:
            self._collect = lambda: names_in_model(model, node_names=node_names)

    @classmethod
    def of_names(cls, taken: Iterable[str]) -> NameScope:
        """A scope in which exactly ``taken`` is taken."""
        scope = cls()
        scope._taken.update(taken)
        return scope

    @classmethod
    def of_proto(cls, model: onnx.ModelProto, *, node_names: bool = False) -> NameScope:
        """A scope of every name of a protobuf ``model`` (:func:`names_in_proto`)."""
        return cls.of_names(names_in_proto(model, node_names=node_names))

    def _names(self) -> set[str]:
        if self._collect is not None:
            self._taken |= self._collect()
            self._collect = None
        return self._taken

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def fresh(self, base: str) -> str:
        """``base``, or ``base_<n>`` with the smallest ``n >= 1`` that is free; the name is taken from now on.

        An empty ``base`` counts as ``"qgraph"``.
        """
        taken = self._names()
        base = base or "qgraph"
        name, counter = base, 1
        while name in taken:
            name, counter = f"{base}_{counter}", counter + 1
        taken.add(name)
        return name

    def reserve(self, names: Iterable[str | None]) -> None:
        """Mark ``names`` as taken (names a builder writes itself, such as an interface name it must keep)."""
        self._names().update(name for name in names if name)


def new_output_name(names: NameScope, node: ir.Node, base_name: str) -> None:
    """Name the outputs of a node a rewrite creates: ``base_name`` for the first, ``base_name_<i>`` for output i."""
    for index, output in enumerate(node.outputs):
        output.name = names.fresh(base_name if index == 0 else f"{base_name}_{index}")

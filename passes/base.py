"""Base classes for qgraph passes.

A :class:`QGraphPass` is an onnx-ir ``InPlacePass`` that declares its :class:`~qgraph.pipeline.phases.Phase` and a
one-line summary. A :class:`RewritePass` is a local rewrite written as three steps over every node of every graph
(main graph, If/Loop/Scan bodies, functions):

- ``match(node)`` returns the matched nodes/values (any object) or ``None``;
- ``check(match)`` returns ``None`` when the rewrite is legal, or a sentence saying why it is not (logged);
- ``rewrite(match)`` mutates the graph.

The ``modified`` flag of the result is true exactly when at least one rewrite ran.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from qgraph.pipeline.phases import Phase

logger = logging.getLogger(__name__)


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


class QGraphPass(InPlacePass):
    """An in-place onnx-ir pass that knows its phase in qgraph's pipeline."""

    phase: ClassVar[Phase]
    summary: ClassVar[str] = ""

    @classmethod
    def pass_name(cls) -> str:
        return cls.__name__

    @classmethod
    def describe(cls) -> str:
        if cls.summary:
            return cls.summary
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else cls.__name__


class RewritePass(QGraphPass):
    """A pass made of local pattern / check / rewrite steps applied to every node once per run."""

    @abc.abstractmethod
    def match(self, node: ir.Node) -> Any | None:
        """The matched pieces around ``node``, or ``None`` when the pattern does not start here."""

    def check(self, match: Any) -> str | None:
        return None

    @abc.abstractmethod
    def rewrite(self, match: Any) -> None:
        """Mutate the graph for a match that passed :meth:`check`."""

    def call(self, model: ir.Model) -> PassResult:
        self.model = model
        modified = False
        for graph in list(iterate_graphs(model)):
            for node in list(graph):
                if node.graph is None:  # removed by an earlier rewrite in this run
                    continue
                match = self.match(node)
                if match is None:
                    continue
                reason = self.check(match)
                if reason is not None:
                    logger.info("%s: leaving %s (%s): %s", self.pass_name(), node.name, node.op_type, reason)
                    continue
                self.rewrite(match)
                modified = True
        return PassResult(model, modified)

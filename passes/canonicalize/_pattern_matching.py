"""Helpers for the fusions that recognise a decomposed operator (LayerNormalization, GELU) in an exported graph.

Not a pass (the leading underscore keeps the catalog from importing it as one). A decomposed operator is a chain of
small element-wise nodes in which every intermediate value must be private to the chain: a value that another node
also reads, or that is a graph output, would lose its producer when the chain becomes one node. The helpers answer:

- which operand of a commutative ``Add``/``Mul`` is the constant, and which the activation (exporters write either
  order);
- is a constant a single number close to an expected one (relative tolerance, since exporters print constants with
  six to eight significant digits: ``1.4142135``, ``0.70710678``, ``0.7978845608``);
- is a value read by exactly the expected nodes of the chain and by nothing else (fan-out refuses a fusion);
- a refusal that only the model's opset causes (:class:`OpsetRefusal`, which UpgradeOpsetForFusions looks for).

:class:`AnalysedFusion` is the check the element-wise fusions share: a chain inside a function body is refused (its
constants are not initializers), and the analysis raises :class:`FusionRefused` with the reason anywhere it fails.

The questions every pass asks — is a node a default-domain ``op_type`` node, which node is the sole consumer of a
value and why there is none, which default-domain opset the model imports (the fused operator's availability
depends on it), importing com.microsoft — are answered in :mod:`qgraph.ir.values` and re-exported here.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers
from qgraph.ir.values import (  # noqa: F401 - re-exported for the fusions
    MICROSOFT_DOMAIN,
    constant_array,
    default_opset,
    ensure_microsoft_domain,
    is_constant,
    is_op,
    sole_consumer,
    sole_consumer_refusal,
)
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass


@dataclasses.dataclass(frozen=True)
class FusedChain:
    """A recognised chain of nodes that computes ``output`` from ``data``: what a fusion replaces by one node."""

    data: ir.Value
    output: ir.Value
    nodes: tuple[ir.Node, ...]


def replace_chain(graph: ir.Graph, chain: Iterable[ir.Node], output: ir.Value, fused: ir.Node) -> None:
    """Put the one-output ``fused`` where ``chain`` was (after the last of its nodes in graph order), readers of
    ``output`` reading it instead, and drop the chain's initializers that nobody reads any more."""
    order = {id(node): index for index, node in enumerate(graph)}
    nodes = sorted(chain, key=lambda node: order[id(node)])
    constants = [value for node in nodes for value in node.inputs if value is not None and value.is_initializer()]
    ir.convenience.replace_nodes_and_values(graph, nodes[-1], nodes, [fused], [output], [fused.outputs[0]])
    drop_unused_initializers(constants)


class FusionRefused(Exception):
    """Raised inside a fusion's analysis with the reason the fusion is refused."""


class AnalysedFusion(RewritePass):
    """A CANONICALIZE fusion whose ``check`` is ``analyse`` on the matched node of a graph (not a function body)."""

    phase = Phase.CANONICALIZE
    #: What the pass fuses, as its refusals name it.
    fused = ""

    @abc.abstractmethod
    def analyse(self, match: ir.Node, context: RewriteContext) -> object:
        """The plan for the chain around ``match``; raises FusionRefused with the reason when there is none."""

    def check(self, match: ir.Node, context: RewriteContext) -> object | Refusal:
        if not isinstance(match.graph, ir.Graph):
            return Refusal(f"{self.fused} inside a function body (its constants are not initializers)")
        try:
            return self.analyse(match, context)
        except FusionRefused as refusal:
            return Refusal(str(refusal))


def producer_if(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The producer of ``value`` when it is a default-domain ``op_type`` node, else ``None``."""
    if value is None:
        return None
    producer = value.producer()
    return producer if is_op(producer, op_type) else None


def private_value_refusal(value: ir.Value, readers: list[ir.Node], role: str) -> str | None:
    """Why ``value`` is not private to ``readers`` (``None`` when only those nodes read it and it is no output)."""
    if value.is_graph_output():
        return f"the {role} {value.name!r} is a graph output"
    allowed = {id(node) for node in readers}
    others = sorted({f"{use.node.op_type} {use.node.name!r}" for use in value.uses() if id(use.node) not in allowed})
    if others:
        return f"the {role} {value.name!r} is also read by {', '.join(others)} (fan-out)"
    return None


def scalar_constant(value: ir.Value | None) -> float | None:
    """The single number held by a constant initializer ``value`` (any shape with one element), else ``None``."""
    array = constant_array(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))


def close_to(actual: float | None, expected: float, relative_tolerance: float) -> bool:
    """``actual`` is within ``relative_tolerance`` of ``expected`` (relative to ``|expected|``)."""
    if actual is None or not math.isfinite(actual):
        return False
    return abs(actual - expected) <= relative_tolerance * abs(expected)


def split_constant_operand(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """For a binary node with exactly one constant operand: ``(activation, constant)``; ``None`` otherwise."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    first_constant = is_constant(node.inputs[0])
    second_constant = is_constant(node.inputs[1])
    if first_constant == second_constant:
        return None
    return (node.inputs[1], node.inputs[0]) if first_constant else (node.inputs[0], node.inputs[1])


def other_operand(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The operand of a binary node that is not ``value`` (``value`` itself when the node reads it twice)."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is value:
        return node.inputs[1]
    if node.inputs[1] is value:
        return node.inputs[0]
    return None


@dataclasses.dataclass(frozen=True)
class OpsetRefusal(Refusal):
    """A fusion that would be made but for the model's default-domain opset, which must be at least ``needed``."""

    needed: int = 0

"""Helpers for the fusions that recognise a decomposed operator (LayerNormalization, GELU) in an exported graph.

Not a pass (the leading underscore keeps the catalog from importing it as one). A decomposed operator is a chain of
small element-wise nodes in which every intermediate value must be private to the chain: a value that another node
also reads, or that is a graph output, would lose its producer when the chain becomes one node. The helpers answer:

- which operand of a commutative ``Add``/``Mul`` is the constant, and which the activation (exporters write either
  order);
- is a constant a single number close to an expected one (relative tolerance, since exporters print constants with
  six to eight significant digits: ``1.4142135``, ``0.70710678``, ``0.7978845608``);
- is a value read by exactly the expected nodes of the chain and by nothing else (fan-out refuses a fusion);
- which default-domain opset the model imports (the fused operator's availability depends on it).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qgraph.passes._rewrite_support import constant_array

DEFAULT_DOMAINS = ("", "ai.onnx")
MICROSOFT_DOMAIN = "com.microsoft"


def is_op(node: ir.Node | None, op_type: str) -> bool:
    """``node`` is a default-domain ``op_type`` node."""
    return node is not None and node.op_type == op_type and node.domain in DEFAULT_DOMAINS


def producer_if(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The producer of ``value`` when it is a default-domain ``op_type`` node, else ``None``."""
    if value is None:
        return None
    producer = value.producer()
    return producer if is_op(producer, op_type) else None


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The single node that reads ``value`` (through one or more of its inputs), or ``None``.

    A value that is a graph output, or that two different nodes read, has no sole consumer.
    """
    if value.is_graph_output():
        return None
    consumers = {id(use.node): use.node for use in value.uses()}
    if len(consumers) != 1:
        return None
    return next(iter(consumers.values()))


def private_value_refusal(value: ir.Value, readers: list[ir.Node], role: str) -> str | None:
    """Why ``value`` is not private to ``readers`` (``None`` when only those nodes read it and it is no output)."""
    if value.is_graph_output():
        return f"the {role} {value.name!r} is a graph output"
    allowed = {id(node) for node in readers}
    others = sorted({f"{use.node.op_type} {use.node.name!r}" for use in value.uses() if id(use.node) not in allowed})
    if others:
        return f"the {role} {value.name!r} is also read by {', '.join(others)} (fan-out)"
    return None


def fan_out_reason(value: ir.Value, role: str) -> str:
    """Why ``value``, which should have exactly one reader, has not (graph output, several readers or none)."""
    if value.is_graph_output():
        return f"the {role} {value.name!r} is a graph output"
    readers = sorted({f"{use.node.op_type} {use.node.name!r}" for use in value.uses()})
    if not readers:
        return f"the {role} {value.name!r} is never read"
    return f"the {role} {value.name!r} is read by {', '.join(readers)} (fan-out)"


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
    first_constant = constant_array(node.inputs[0]) is not None
    second_constant = constant_array(node.inputs[1]) is not None
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


def default_opset(model: ir.Model) -> int:
    """The default-domain opset version the model imports (0 when it imports none)."""
    for domain in DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return 0


def ensure_microsoft_domain(model: ir.Model) -> None:
    """Import the com.microsoft domain (version 1) if the model does not already."""
    if MICROSOFT_DOMAIN not in model.opset_imports:
        model.opset_imports[MICROSOFT_DOMAIN] = 1

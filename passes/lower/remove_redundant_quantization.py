"""RemoveRedundantQuantization: ``DQ(s, z) → Q(s, z)`` pairs vanish, and Q/DQ nodes nobody reads are removed.

For an integer tensor ``q`` in range and identical parameters (integer type, scale, zero point, axis):

    Q(DQ(q)) = saturate(round(((q - z)·s) / s) + z) = q

so a QuantizeLinear whose input is a DequantizeLinear with the same parameters is an identity on the integer
tensor: its readers read the DQ's input instead. The integer tensor takes the Q output's name only when it is a
node output that is not a graph output; a graph input, an initializer or a graph output keeps its own name (the
model's interface does not change). This collapses ``Q → DQ → Q`` chains and the ``DQ → Q`` pairs
left between two integer operators after lowering; the DQ goes too when nothing else reads it. A QuantizeLinear or
DequantizeLinear whose outputs are read by nobody (and are not graph outputs) is dead and is removed, together with
the constants only it read, so a final run of this pass leaves no orphan Q/DQ.

Refused (logged): different or non-constant parameters (a requantization), a Q output that is a graph output
while the integer tensor is a graph input, an initializer or another graph output (renaming it would change the
model's interface).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.passes.lower import _qdq_patterns as qdq


def _is_dead(node: ir.Node) -> bool:
    return not any(output.uses() or output.is_graph_output() for output in node.outputs)


def _may_be_renamed(value: ir.Value) -> bool:
    """Whether ``value`` may take another name: a node output that is not part of the graph's interface."""
    return value.producer() is not None and not value.is_graph_output()


@dataclasses.dataclass(frozen=True)
class _DeadNode:
    """A Q or DQ whose outputs nobody reads: it goes, with the Q/DQ producers only it read."""

    node: ir.Node


@dataclasses.dataclass(frozen=True)
class _Pair:
    """``Q(DQ(q))``: the Q and the DQ that feeds it; an identity on ``q`` once check has compared their parameters."""

    quantize: ir.Node
    dequantize: ir.Node


@register
class RemoveRedundantQuantization(RewritePass):
    """Collapse DQ → Q pairs with identical parameters and drop Q/DQ nodes nobody reads."""

    phase = Phase.LOWER
    summary = "DQ(s,z) → Q(s,z) becomes the integer tensor itself; unread Q/DQ nodes are removed"

    def match(self, node: ir.Node, context: RewriteContext) -> _DeadNode | _Pair | None:
        if not qdq.is_op(node, qdq.QUANTIZE, qdq.DEQUANTIZE):
            return None
        if _is_dead(node):
            return _DeadNode(node)
        if node.op_type == qdq.QUANTIZE:
            dequantize = qdq.dequantize_of(node.inputs[0])
            if dequantize is not None:
                return _Pair(node, dequantize)
        return None

    def check(self, match: _DeadNode | _Pair, context: RewriteContext) -> _DeadNode | _Pair | Refusal:
        if isinstance(match, _DeadNode):
            return match
        node, dequantize = match.quantize, match.dequantize
        mismatch = qdq.pair_mismatch(node, dequantize)
        if mismatch is not None:
            return Refusal(mismatch)
        if node.outputs[0].is_graph_output() and not _may_be_renamed(dequantize.inputs[0]):
            return Refusal("the Q output is a graph output and its replacement cannot take its name")
        return match

    def rewrite(self, plan: _DeadNode | _Pair, context: RewriteContext) -> None:
        if isinstance(plan, _DeadNode):
            self._remove_dead_chain(plan.node)
            return
        integer = plan.dequantize.inputs[0]
        if _may_be_renamed(integer):
            qdq.take_over(plan.quantize.outputs[0], integer)
        else:  # check made sure the Q output is no graph output: only its readers move
            plan.quantize.outputs[0].replace_all_uses_with(integer)
        qdq.remove_if_unused([plan.quantize, plan.dequantize])

    @staticmethod
    def _remove_dead_chain(node: ir.Node) -> None:
        """Remove a dead Q/DQ and then every Q/DQ producer that only it read (producers come earlier in the graph,
        so one run must walk up the chain itself to stay idempotent)."""
        pending = [node]
        while pending:
            current = pending.pop()
            if current.graph is None or not _is_dead(current):
                continue
            producers = [value.producer() for value in current.inputs if value is not None]
            qdq.remove_if_unused([current])
            pending += [producer for producer in producers if qdq.is_op(producer, qdq.QUANTIZE, qdq.DEQUANTIZE)]

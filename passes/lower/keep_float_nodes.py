"""KeepFloatNodes: chosen nodes of a QDQ graph compute in float, so that lowering leaves them FP32.

Run before the target's lowering passes, on the QDQ graph (docs/qdq-format.md). ``nodes`` names a *float region*
``S``; the pass edits only around it:

- a constant input of a node of ``S`` read through ``DQ(Wq; s, z)`` (a weight, a bias) becomes the float constant
  ``W = (Wq - z)·s``, the value the DQ computes, so the node's output does not change; no integer kernel matches a
  node without a DQ weight, and the node stays float when the graph is lowered;
- an *interior* tensor ``t``, produced by a node of ``S`` (or a graph input) and read back only by nodes of ``S``
  through ``DQ(Q(t))``, is read directly: the readers lose one rounding, ``|t - DQ(Q(t))| <= s/2`` inside the
  range, so the region computes closer to FP32 than the QDQ graph did;
- tensors that cross the border of ``S`` keep their Q/DQ, so the integer nodes around the region lower as before
  and read and write the integers the plan gave them.

A node of ``S`` with no constant DQ input and no interior output (an Add or Mul whose inputs and output all cross
the border) cannot be kept float this way: the lowering passes would fuse its DQ/Q again; it is logged and left.
Q/DQ nodes that nobody reads after the edit are removed, with the constants only they read.

The region and the integer graph around it are a latency choice (see :mod:`qgraph.speed_choice`): on
onnxruntime 1.19.2 a depthwise QLinearConv ran 1.5–3× slower than the FP32 depthwise kernel on an AVX-512 VNNI CPU,
while the Transposes and NCHWc reorders that a lone FP32 island costs ate more than the gain
(docs/runtime-facts.md).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.passes.lower import _qdq_patterns as qdq

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _FloatNodeMatch:
    node: ir.Node
    #: (input index, DQ node) for each constant input read through a DQ.
    constant_inputs: tuple[tuple[int, ir.Node], ...]
    #: (Q node, DQ node) pairs on an output of the node whose DQ only nodes of the region read.
    interior_pairs: tuple[tuple[ir.Node, ir.Node], ...]


@dataclasses.dataclass(frozen=True)
class _FloatNodePlan:
    node: ir.Node
    #: (input index, DQ node, the float constant ``(Wq - z)·s`` that replaces the DQ's output).
    float_constants: tuple[tuple[int, ir.Node, np.ndarray], ...]
    interior_pairs: tuple[tuple[ir.Node, ir.Node], ...]


@register
class KeepFloatNodes(RewritePass):
    """Make the named nodes of a QDQ graph float (dequantized constants, no Q/DQ inside the region)."""

    phase = Phase.LOWER
    summary = "named nodes compute in float: DQ(constant) inputs become float constants, interior Q/DQ pairs go"

    def __init__(self, *, nodes: frozenset[str] | set[str] | tuple[str, ...] = frozenset()) -> None:
        super().__init__()
        self.nodes = frozenset(nodes)

    def match(self, node: ir.Node, context: RewriteContext) -> _FloatNodeMatch | None:
        if node.name not in self.nodes or qdq.is_op(node, qdq.QUANTIZE, qdq.DEQUANTIZE):
            return None
        constant_inputs = tuple(
            (index, dequantize)
            for index, value in enumerate(node.inputs)
            if (dequantize := qdq.dequantize_of(value)) is not None
            and qdq.constant_array(dequantize.inputs[0]) is not None
        )
        interior = list(node.outputs)
        interior += [value for value in node.inputs if value is not None and self._reads_graph_input(value)]
        interior_pairs = tuple(pair for value in interior for pair in self._interior_pairs(value))
        return _FloatNodeMatch(node, constant_inputs, interior_pairs)

    def check(self, match: _FloatNodeMatch, context: RewriteContext) -> _FloatNodePlan | Refusal:
        float_constants = []
        for index, dequantize in match.constant_inputs:
            params = qdq.read_params(dequantize)
            array = None if isinstance(params, str) else qdq.dequantized_constant(params)
            if array is None:  # parameters that are not constants: this input keeps its DQ
                logger.info("%s: %s input %d keeps its DQ (%s)", self.pass_name(), qdq.describe_node(match.node),
                            index, params if isinstance(params, str) else "its integer input is not a constant")
                continue
            float_constants.append((index, dequantize, array))
        if float_constants or match.interior_pairs:
            return _FloatNodePlan(match.node, tuple(float_constants), match.interior_pairs)
        if any(qdq.dequantize_of(value) is not None for value in match.node.inputs):
            return Refusal("no constant DQ input and no output read only inside the region: the lowering would fuse "
                           "its Q/DQ again, so it stays as the plan made it")
        return Refusal("already float")

    def rewrite(self, plan: _FloatNodePlan, context: RewriteContext) -> None:
        node = plan.node
        graph = node.graph
        for index, dequantize, array in plan.float_constants:
            constant = qdq.add_constant(graph, context.names, f"{dequantize.outputs[0].name}_float", array,
                                        before=node)
            node.replace_input_with(index, constant)
            qdq.remove_if_unused([dequantize])
        for quantize, dequantize in plan.interior_pairs:
            dequantize.outputs[0].replace_all_uses_with(quantize.inputs[0])
            qdq.remove_if_unused([dequantize, quantize])

    @staticmethod
    def _reads_graph_input(value: ir.Value) -> bool:
        """``value`` is ``DQ(Q(x))`` of a graph input ``x``."""
        dequantize = qdq.dequantize_of(value)
        quantize = dequantize.inputs[0].producer() if dequantize is not None else None
        return qdq.is_op(quantize, qdq.QUANTIZE) and quantize.inputs[0].is_graph_input()

    def _interior_pairs(self, output: ir.Value) -> list[tuple[ir.Node, ir.Node]]:
        """``Q(output) → DQ`` pairs whose DQ is read only by nodes of the region (never a graph output); for a
        ``DQ(Q(x))`` of a graph input ``x``, the pairs after ``x``."""
        if self._reads_graph_input(output):
            output = output.producer().inputs[0].producer().inputs[0]
        pairs = []
        for quantize, _ in output.uses():
            if not qdq.is_op(quantize, qdq.QUANTIZE) or quantize.outputs[0].is_graph_output():
                continue
            for dequantize, _ in quantize.outputs[0].uses():
                if not qdq.is_op(dequantize, qdq.DEQUANTIZE) or dequantize.outputs[0].is_graph_output():
                    continue
                readers = [reader for reader, _ in dequantize.outputs[0].uses()]
                if readers and all(reader.name in self.nodes for reader in readers):
                    pairs.append((quantize, dequantize))
        return pairs

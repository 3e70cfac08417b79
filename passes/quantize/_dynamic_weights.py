"""The options shared by the quantize passes that store int8 weights for onnxruntime's dynamically quantized kernels.

Those kernels (``DynamicQuantizeLSTM``, ``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``) quantize their
activations per call and read weights stored as int8 in ``[-qmax, qmax]`` (symmetric; per output channel or per
tensor). ``guard_saturation`` stores 7-bit weights (``|w| <= 64``) where the u8·s8 kernels of a CPU without VNNI
could saturate (see :mod:`qgraph.passes.lower._qdq_patterns`).
"""

from __future__ import annotations

import abc
import logging

import onnx_ir as ir
from onnx_ir.passes import PassResult

from qgraph.ir.naming import NameScope
from qgraph.ir.traversal import iterate_graphs
from qgraph.ir.values import ensure_microsoft_domain, is_op
from qgraph.passes.infrastructure import Phase, QGraphPass


class DynamicWeightPass(QGraphPass):
    """A QUANTIZE pass over the named ``nodes`` that stores their weights as int8 for a dynamic kernel.

    ``call`` visits every graph (subgraphs included), plans each named node of ``op_types`` with ``plan`` (a reason
    string leaves the node as it is, logged), then hands the graph's planned nodes to ``replace_planned``.
    """

    phase = Phase.QUANTIZE
    #: The default-domain op types the pass replaces.
    op_types: tuple[str, ...] = ()
    #: What the replaced nodes run as, for the closing log line.
    replacement: str = ""

    def __init__(
        self, *, nodes: tuple[str, ...] = (), qmax: int = 127, per_channel: bool = True, guard_saturation: bool = True
    ) -> None:
        super().__init__()
        if not 1 <= qmax <= 127:
            raise ValueError(f"qmax must lie in [1, 127], got {qmax}")
        self.nodes = frozenset(nodes)
        self.qmax = qmax
        self.per_channel = per_channel
        self.guard_saturation = guard_saturation

    @abc.abstractmethod
    def plan(self, node: ir.Node) -> object | str:
        """What ``replace_planned`` needs to replace ``node``, or the reason it stays as it is."""

    @abc.abstractmethod
    def replace_planned(self, graph: ir.Graph, planned: list[tuple[ir.Node, object]], names: NameScope) -> None:
        """Replace the planned nodes of ``graph`` (in graph order, each with its plan)."""

    def call(self, model: ir.Model) -> PassResult:
        logger = logging.getLogger(type(self).__module__)
        names = NameScope(model)
        replaced = 0
        for graph in list(iterate_graphs(model)):
            if not isinstance(graph, ir.Graph):
                continue
            planned: list[tuple[ir.Node, object]] = []
            for node in list(graph):
                if not is_op(node, *self.op_types) or node.name not in self.nodes:
                    continue
                plan = self.plan(node)
                if isinstance(plan, str):
                    logger.info("%s: leaving %s (%s): %s", self.pass_name(), node.name, node.op_type, plan)
                    continue
                planned.append((node, plan))
            self.replace_planned(graph, planned, names)
            replaced += len(planned)
        if replaced:
            ensure_microsoft_domain(model)
            logger.info("%s: %d %s node(s) now run as %s", self.pass_name(), replaced, "/".join(self.op_types),
                        self.replacement)
        return PassResult(model, replaced > 0)

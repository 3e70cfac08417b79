"""Helpers shared by the canonicalization rewrites that fold constants into producers.

Not a pass (the leading underscore keeps the catalog from importing it as one). The helpers answer the questions
every such rewrite asks before it may touch a graph:

- is this value a constant that a rewrite may read (an initializer or constant that no caller can override)?
- is a node the only reader of a value, so that rewiring it changes nobody else's result?
- what rank and element type does a value have, when shape inference did not annotate it?

and give the one way these passes write new data: always a *fresh* initializer with a model-unique name, never an
in-place change of an existing tensor (which another node may share). An initializer nobody reads any more after a
rewrite is dropped on the spot, unless it is also a graph input or output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from qgraph.ir.traversal import iterate_graphs

logger = logging.getLogger(__name__)

#: Element types the folding passes compute with (in float64) and store back.
FLOATING_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})

#: Operators whose output has the shape and element type of their first input.
_SHAPE_AND_TYPE_PRESERVING = frozenset(
    {
        "Abs", "Ceil", "Celu", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
        "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign",
        "Sin", "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu", "Dropout", "LRN", "BatchNormalization",
        "InstanceNormalization", "Softmax", "LogSoftmax",
    }
)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The data of ``value`` when it is a constant no caller can override; ``None`` otherwise.

    A constant here is an initializer: an initializer that is also a graph input is a default the caller may
    replace at run time, so it is not one. A ``Constant`` node's output is not one either (LiftConstants, earlier
    in the canonical pipeline, turns it into an initializer); this also keeps every rewrite out of function
    bodies, which cannot hold the new initializers a rewrite writes.
    """
    if constant_refusal(value, "value") is not None:
        return None
    return value.const_value.numpy()


def constant_refusal(value: ir.Value | None, role: str) -> str | None:
    """Why ``value`` cannot be read as a constant (``None`` when it can); ``role`` names it in the sentence."""
    if value is None:
        return f"{role} is missing"
    if value.is_graph_input():
        return f"{role} {value.name!r} is a graph input (a caller can override it)"
    if value.const_value is None or not value.is_initializer():
        return f"{role} {value.name!r} is not a constant initializer"
    return None


def dtype_refusal(value: ir.Value, role: str) -> str | None:
    """Why the element type of a constant ``value`` is not one the rewrites compute with."""
    dtype = value.const_value.dtype if value.const_value is not None else value.dtype
    if dtype not in FLOATING_DTYPES:
        name = dtype.name if dtype is not None else "unknown"
        return f"{role} {value.name!r} has element type {name}; only float, double and float16 are folded"
    return None


def sole_reader_refusal(value: ir.Value, reader: ir.Node) -> str | None:
    """Why rewiring ``value`` would change something besides ``reader`` (``None`` when it would not)."""
    if value.is_graph_output():
        return f"{value.name!r} is a graph output"
    readers = {use.node for use in value.uses()}
    if readers != {reader} or len(value.uses()) != 1:
        return f"{value.name!r} has other consumers besides {reader.op_type} (fan-out)"
    return None


def same_graph_refusal(first: ir.Node, second: ir.Node) -> str | None:
    if first.graph is not second.graph:
        return f"{first.op_type} and {second.op_type} live in different graphs"
    return None


def known_rank_and_dtype(value: ir.Value) -> tuple[int | None, ir.DataType | None]:
    """Rank and element type of ``value``, looking back through shape- and type-preserving producers if needed.

    Shape inference may have left a value unannotated (a model built by hand, or a value a rewrite just made);
    the element-wise producers before it still tell its rank and type. Conv and ConvTranspose outputs have the
    rank of their weight.
    """
    rank: int | None = None
    dtype: ir.DataType | None = None
    current: ir.Value | None = value
    for _ in range(64):  # a bound: never walk a long chain node by node on a big model
        if current is None:
            break
        if rank is None and current.shape is not None:
            rank = len(current.shape)
        if dtype is None and current.dtype is not None:
            dtype = current.dtype
        if rank is not None and dtype is not None:
            break
        producer = current.producer()
        if producer is None or producer.domain not in ("", "ai.onnx") or not producer.inputs:
            break
        if producer.op_type in ("Conv", "ConvTranspose") and len(producer.inputs) > 1:
            weight = producer.inputs[1]
            if rank is None and weight is not None and weight.shape is not None:
                rank = len(weight.shape)
            current = producer.inputs[0]
        elif producer.op_type in _SHAPE_AND_TYPE_PRESERVING and current.index() == 0:
            current = producer.inputs[0]
        else:
            break
    return rank, dtype


class NameScope:
    """Model-unique names for the values and initializers a pass creates.

    ONNX forbids a subgraph from reusing a name of an enclosing graph, so names are checked against the whole
    model, once per pass run, and remembered as they are handed out.
    """

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        for graph in iterate_graphs(model):
            self._add(graph.inputs)
            if isinstance(graph, ir.Graph):
                self._taken.update(graph.initializers)
            for node in graph:
                self._add(node.inputs)
                self._add(node.outputs)

    def _add(self, values: Iterable[ir.Value | None]) -> None:
        for value in values:
            if value is not None and value.name:
                self._taken.add(value.name)

    def fresh(self, base: str) -> str:
        base = base or "qgraph"
        name, counter = base, 1
        while name in self._taken:
            name, counter = f"{base}_{counter}", counter + 1
        self._taken.add(name)
        return name


def new_initializer(graph: ir.Graph, names: NameScope, base_name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` under a fresh name derived from ``base_name``."""
    name = names.fresh(base_name)
    # np.ascontiguousarray would turn a 0-d array into shape (1,); asarray keeps scalars scalar.
    array = np.asarray(array, order="C")
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value


def new_output_name(names: NameScope, node: ir.Node, base_name: str) -> None:
    """Name the outputs of a node a rewrite creates, so that no automatic name can collide with the model's."""
    for index, output in enumerate(node.outputs):
        output.name = names.fresh(base_name if index == 0 else f"{base_name}_{index}")


def drop_unused_initializers(values: Iterable[ir.Value | None]) -> None:
    """Remove each initializer of ``values`` that no node reads any more (graph inputs and outputs are kept)."""
    for value in values:
        if value is None or not value.is_initializer() or value.uses():
            continue
        if value.is_graph_input() or value.is_graph_output():
            continue
        graph = value.graph
        if graph is not None and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
            logger.debug("dropped initializer %s that no node reads any more", value.name)


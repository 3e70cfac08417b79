"""Helpers shared by the canonicalization rewrites that fold constants into producers.

Not a pass (the leading underscore keeps the catalog from importing it as one). The rewrites ask the questions of
:mod:`qgraph.ir.values` before they may touch a graph — is this value a constant no caller can override
(:func:`~qgraph.ir.values.constant_refusal`), is a node the sole consumer of a value, so that rewiring it changes
nobody else's result (:func:`~qgraph.ir.values.sole_consumer_refusal`) — and the ones answered here, which only the
folding rewrites ask:

- is the element type of a constant one the rewrites compute with (float, double, float16)?
- do two nodes live in the same graph?
- what rank and element type does a value have, when shape inference did not annotate it?

They write new data the one way :mod:`qgraph.ir.edit` gives: always a *fresh* initializer with a model-unique name
(:mod:`qgraph.ir.naming`), never an in-place change of an existing tensor (which another node may share). An
initializer nobody reads any more after a rewrite is dropped on the spot, unless it is also a graph input or output.
The vocabulary they import from here is re-exported from qgraph.ir, not defined again.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer  # noqa: F401 - re-exported for the rewrites
from qgraph.ir.naming import NameScope, new_output_name  # noqa: F401 - re-exported for the rewrites
from qgraph.ir.values import constant_array, constant_refusal, sole_consumer_refusal  # noqa: F401 - re-exported

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


def dtype_refusal(value: ir.Value, role: str) -> str | None:
    """Why the element type of a constant ``value`` is not one the rewrites compute with."""
    dtype = value.const_value.dtype if value.const_value is not None else value.dtype
    if dtype not in FLOATING_DTYPES:
        name = dtype.name if dtype is not None else "unknown"
        return f"{role} {value.name!r} has element type {name}; only float, double and float16 are folded"
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

"""DecomposeBatchNorm: a lone inference BatchNormalization becomes ``Add(Mul(x, s), t)``.

Inference BatchNormalization over channel axis 1 of an (N, C, D1, ..., Dk) input, in float64::

    y = gamma * (x - mean) / sqrt(var + epsilon) + beta = s * x + t
    s = gamma / sqrt(var + epsilon),    t = beta - mean * s

s and t are stored in the input's element type with shape (C, 1, ..., 1) — k trailing ones for an input of rank
k + 2 — so that numpy/ONNX broadcasting (aligned from the right) lines them up with axis 1; for a rank-2 input
(N, C) that shape is just (C,). The rank comes from the input's shape, or from the shape-preserving producers
before it; when it is unknown the BatchNorm is left alone, because a wrong rank would broadcast on the wrong axis.

This pass is for BatchNorms that no producer can absorb. A BatchNorm that FoldBatchNorm can fold (the shared
predicate :func:`qgraph.passes.canonicalize._batch_norm_math.plan_fold`) is refused with "foldable into producer", so
that in the canonical pipeline (… FoldBatchNorm, DecomposeBatchNorm …) this pass never steals a fold. Training-mode
BatchNorms and non-constant parameters are refused as in FoldBatchNorm.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from qgraph.passes._rewrite_support import (
    FLOATING_DTYPES,
    drop_unused_initializers,
    known_rank_and_dtype,
    new_initializer,
    new_output_name,
)
from qgraph.passes.canonicalize._batch_norm_math import (
    BatchNormAffine,
    BatchNormRewrite,
    batch_norm_affine,
    plan_fold,
)
from qgraph.passes.infrastructure import RewriteContext, register

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Decomposition:
    batch_norm: ir.Node
    affine: BatchNormAffine
    rank: int
    dtype: ir.DataType


def plan_decomposition(node: ir.Node) -> _Decomposition | str:
    """How ``node`` becomes Mul + Add, or why it does not."""
    affine = batch_norm_affine(node)
    if isinstance(affine, str):
        return affine
    if not isinstance(plan_fold(node), str):
        return "foldable into producer (FoldBatchNorm folds it)"
    rank, dtype = known_rank_and_dtype(node.inputs[0])
    output_rank, output_dtype = known_rank_and_dtype(node.outputs[0])
    rank = rank if rank is not None else output_rank
    dtype = dtype if dtype is not None else output_dtype
    if rank is None:
        return "the input rank is unknown, so the (C, 1, ...) broadcast shape of scale and shift is unknown"
    if rank < 2:
        return f"the input has rank {rank}; BatchNormalization needs (N, C, ...)"
    if dtype is None:
        return "the input element type is unknown"
    if dtype not in FLOATING_DTYPES:
        return f"the input element type is {dtype.name}; only float, double and float16 are decomposed"
    shape = node.inputs[0].shape
    if shape is not None and isinstance(shape[1], int) and shape[1] != affine.channels:
        return f"the input has {shape[1]} channels but the parameters have {affine.channels}"
    return _Decomposition(batch_norm=node, affine=affine, rank=rank, dtype=dtype)


@register
class DecomposeBatchNorm(BatchNormRewrite):
    """Rewrite an inference BatchNormalization that no producer can absorb as Mul + Add."""

    summary = "Rewrite a lone inference BatchNormalization as Mul by a per-channel scale and Add of a shift"

    def plan(self, batch_norm: ir.Node) -> _Decomposition | str:
        return plan_decomposition(batch_norm)

    def rewrite(self, plan: _Decomposition, context: RewriteContext) -> None:
        batch_norm, names = plan.batch_norm, context.names
        graph = batch_norm.graph
        numpy_dtype = plan.dtype.numpy()
        broadcast_shape = (plan.affine.channels,) + (1,) * (plan.rank - 2)
        base = batch_norm.name or "batch_norm"
        scale = new_initializer(
            graph, names, f"{base}_scale", plan.affine.scale.reshape(broadcast_shape).astype(numpy_dtype)
        )
        shift = new_initializer(
            graph, names, f"{base}_shift", plan.affine.shift.reshape(broadcast_shape).astype(numpy_dtype)
        )
        source = batch_norm.inputs[0]
        multiply = ir.Node("", "Mul", [source, scale], name=f"{batch_norm.name}_scale" if batch_norm.name else None)
        new_output_name(names, multiply, f"{base}_scaled")
        multiply.outputs[0].type = ir.TensorType(plan.dtype)
        multiply.outputs[0].shape = source.shape
        add = ir.Node(
            "", "Add", [multiply.outputs[0], shift], name=f"{batch_norm.name}_shift" if batch_norm.name else None
        )
        old_parameters = list(batch_norm.inputs[1:])
        ir.convenience.replace_nodes_and_values(
            graph, batch_norm, [batch_norm], [multiply, add], [batch_norm.outputs[0]], [add.outputs[0]]
        )
        drop_unused_initializers(old_parameters)
        logger.debug("decomposed BatchNormalization %s into Mul + Add", batch_norm.name)

"""MergeBiasAdd: merge ``Add(producer(...), c)`` with a constant per-output-channel c into the producer's bias.

Broadcasting aligns shapes from the right. For a producer output of rank r with the channel on axis 1, pad c's shape
with leading ones to rank r; c is a per-channel bias exactly when that padded shape is 1 on every axis except axis
1, where it is 1 or C. Then ``Add`` neither changes the output shape nor adds different values across the batch or
spatial positions, and::

    Conv(x, W, b) + c          = Conv(x, W, b + c')              c' = c broadcast to (C,)
    ConvTranspose(x, W, b) + c = ConvTranspose(x, W, b + c')     C = W.shape[1] * group
    MatMul(A, W) + c           = Gemm(A, W, c')                  A (M, K) and W (K, N) 2-D, c' (N,)
    Gemm(A, B, C; beta) + c    = Gemm(A, B, beta * C + c; beta=1)

(b = 0 and C = 0 when absent; sums in float64, stored in the producer's element type.) So (C, 1, 1) and
(1, C, 1, 1) are channel biases of an NCHW output, while a (C,) constant is not: padded to (1, 1, 1, C) it runs
along the last axis W, so it is refused whatever W's length. For MatMul and Gemm (output (M, N)), (N,), (1, N),
(1,) and () are per-feature biases; Gemm also takes an (M, N) or (M, 1) constant when M is known, since C may have
that shape. MatMul becomes Gemm only when its input is 2-D (Gemm is only defined on matrices) and its weight a 2-D
constant.

Refused (logged, graph unchanged): the producer's output has another reader or is a graph output; c, the existing
bias or C is not a constant (or is a graph input); c would change the output shape or is not per channel; the
element type is not float, double or float16. New biases are always new initializers: one shared with another node
is never changed in place.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.ir.values import static_shape
from qgraph.passes._rewrite_support import (
    FLOATING_DTYPES,
    constant_array,
    constant_refusal,
    drop_unused_initializers,
    dtype_refusal,
    known_rank_and_dtype,
    new_initializer,
    same_graph_refusal,
    sole_consumer_refusal,
)
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register

logger = logging.getLogger(__name__)

_PRODUCERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclasses.dataclass(frozen=True)
class _BiasAdd:
    add: ir.Node
    producer: ir.Node
    bias: ir.Value


@dataclasses.dataclass(frozen=True)
class _BiasMerge:
    """An accepted match and the constants the merge adds: the Add's ``bias`` and the producer's existing bias."""

    add: ir.Node
    producer: ir.Node
    bias: ir.Value
    bias_array: np.ndarray
    existing_bias: np.ndarray | None  # Conv/ConvTranspose B or Gemm C; None when the producer has none
    channels: int  # output channels of a Conv/ConvTranspose, output features of a MatMul/Gemm


def is_channel_bias(shape: tuple[int, ...], rank: int, channels: int) -> bool:
    """True when a constant of ``shape`` added to a rank-``rank`` output adds one value per channel of axis 1.

    Aligned from the right and padded with leading ones, the shape must be 1 everywhere except on axis 1, where it
    is 1 (one value for all channels) or ``channels``; a longer shape would change the output's rank.
    """
    if len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return all(size == 1 for axis, size in enumerate(padded) if axis != 1) and padded[1] in (1, channels)


def _output_channels(producer: ir.Node) -> tuple[int, int] | str:
    """(output channels, output rank) of a Conv or ConvTranspose, from its weight's shape."""
    weight_shape = static_shape(producer.inputs[1] if len(producer.inputs) > 1 else None)
    if weight_shape is None or len(weight_shape) < 3:
        return f"{producer.op_type} weight shape is unknown or not (C, C', k...)"
    if producer.op_type == "Conv":
        return weight_shape[0], len(weight_shape)
    return weight_shape[1] * producer.attributes.get_int("group", 1), len(weight_shape)


def _optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


@register
class MergeBiasAdd(RewritePass):
    """Merge an Add of a constant per-channel bias into the Conv/ConvTranspose/Gemm before it (MatMul → Gemm)."""

    phase = Phase.CANONICALIZE
    summary = "Merge Add of a constant per-channel bias into Conv/ConvTranspose/Gemm bias; MatMul + Add to Gemm"

    def match(self, node: ir.Node, context: RewriteContext) -> _BiasAdd | None:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            return None
        if any(value is None for value in node.inputs):
            return None
        candidates = []
        for position in (0, 1):
            producer = node.inputs[position].producer()
            if producer is not None and producer.op_type in _PRODUCERS and producer.domain in ("", "ai.onnx"):
                candidates.append(_BiasAdd(node, producer, node.inputs[1 - position]))
        if not candidates:
            return None
        # Conv + Conv (a residual Add): prefer the side whose other operand is a constant, if any.
        constant = [candidate for candidate in candidates if constant_refusal(candidate.bias, "bias") is None]
        return (constant or candidates)[0]

    def check(self, match: _BiasAdd, context: RewriteContext) -> _BiasMerge | Refusal:
        producer, bias = match.producer, match.bias
        reason = (
            same_graph_refusal(producer, match.add)
            or sole_consumer_refusal(producer.outputs[0], f"the {producer.op_type} output", match.add)
            or constant_refusal(bias, "the added operand")
            or dtype_refusal(bias, "the added operand")
        )
        if reason is not None:
            return Refusal(reason)
        bias_shape = tuple(bias.const_value.shape)
        if producer.op_type in ("Conv", "ConvTranspose"):
            channels = self._check_conv(producer, bias_shape)
        elif producer.op_type == "MatMul":
            channels = self._check_matmul(producer, bias_shape)
        else:
            channels = self._check_gemm(producer, bias_shape)
        if isinstance(channels, str):
            return Refusal(channels)
        existing = constant_array(_optional_input(producer, 2))
        return _BiasMerge(match.add, producer, bias, bias.const_value.numpy(), existing, channels)

    # Each check returns the producer's output channels (features) or the reason the merge is refused.

    def _check_conv(self, conv: ir.Node, bias_shape: tuple[int, ...]) -> int | str:
        channels_and_rank = _output_channels(conv)
        if isinstance(channels_and_rank, str):
            return channels_and_rank
        channels, rank = channels_and_rank
        if not is_channel_bias(bias_shape, rank, channels):
            return (
                f"a constant of shape {bias_shape} added to a rank-{rank} {conv.op_type} output with {channels} "
                "channels is not a per-channel bias (it broadcasts on another axis or changes the shape)"
            )
        existing = _optional_input(conv, 2)
        if existing is not None:
            role = f"{conv.op_type} bias"
            reason = constant_refusal(existing, role) or dtype_refusal(existing, role)
            if reason is not None:
                return reason
        return channels

    def _check_matmul(self, matmul: ir.Node, bias_shape: tuple[int, ...]) -> int | str:
        weight = matmul.inputs[1]
        reason = constant_refusal(weight, "MatMul weight") or dtype_refusal(weight, "MatMul weight")
        if reason is not None:
            return reason
        weight_shape = tuple(weight.const_value.shape)
        if len(weight_shape) != 2:
            return f"MatMul weight has rank {len(weight_shape)}; only a 2-D weight makes a Gemm"
        rank, dtype = known_rank_and_dtype(matmul.inputs[0])
        if rank != 2:
            return f"MatMul input has rank {'unknown' if rank is None else rank}; Gemm needs a 2-D input"
        if dtype is not None and dtype not in FLOATING_DTYPES:
            return f"MatMul input has element type {dtype.name}"
        features = weight_shape[1]
        if not is_channel_bias(bias_shape, 2, features):
            return f"a constant of shape {bias_shape} added to an (M, {features}) MatMul output is not a bias vector"
        return features

    def _check_gemm(self, gemm: ir.Node, bias_shape: tuple[int, ...]) -> int | str:
        existing = _optional_input(gemm, 2)
        if existing is not None:
            reason = constant_refusal(existing, "Gemm C") or dtype_refusal(existing, "Gemm C")
            if reason is not None:
                return reason
        weight_shape = static_shape(gemm.inputs[1])
        if weight_shape is None or len(weight_shape) != 2:
            return "Gemm B shape is unknown"
        features = weight_shape[0] if gemm.attributes.get_int("transB", 0) else weight_shape[1]
        input_shape = static_shape(gemm.inputs[0])
        rows = None
        if input_shape is not None and len(input_shape) == 2:
            rows = input_shape[1] if gemm.attributes.get_int("transA", 0) else input_shape[0]
        if len(bias_shape) > 2:
            return f"a constant of shape {bias_shape} added to a Gemm output changes its rank"
        padded = (1,) * (2 - len(bias_shape)) + bias_shape
        if padded[1] not in (1, features) or padded[0] not in (1, rows):
            return f"a constant of shape {bias_shape} does not broadcast into the ({rows or 'M'}, {features}) output"
        return features

    def rewrite(self, plan: _BiasMerge, context: RewriteContext) -> None:
        names = context.names
        producer, bias_value, bias, existing = plan.producer, plan.bias, plan.bias_array, plan.existing_bias
        graph = plan.add.graph
        base = bias_value.name or f"{producer.name or producer.op_type}_bias"
        if producer.op_type in ("Conv", "ConvTranspose"):
            merged = (existing.astype(np.float64) if existing is not None else 0.0) + np.broadcast_to(
                bias.astype(np.float64).reshape(-1), (plan.channels,)
            )
            merged_value = new_initializer(graph, names, f"{base}_merged", merged.astype(bias.dtype))
            inputs = [producer.inputs[0], producer.inputs[1], merged_value]
            replacement = self._node(producer, producer.op_type, inputs, list(producer.attributes.values()))
        elif producer.op_type == "MatMul":
            merged = np.broadcast_to(bias.reshape(-1), (plan.channels,))
            merged_value = new_initializer(graph, names, f"{base}_gemm", merged.astype(bias.dtype))
            replacement = self._node(producer, "Gemm", [producer.inputs[0], producer.inputs[1], merged_value], [])
        else:
            beta = float(producer.attributes.get_float("beta", 1.0))
            merged = (beta * existing.astype(np.float64) if existing is not None else 0.0) + bias.astype(np.float64)
            merged = np.asarray(merged)
            merged_value = new_initializer(graph, names, f"{base}_merged", merged.astype(bias.dtype))
            attributes = [attribute for name, attribute in producer.attributes.items() if name != "beta"]
            attributes.append(ir.AttrFloat32("beta", 1.0))
            replacement = self._node(
                producer, "Gemm", [producer.inputs[0], producer.inputs[1], merged_value], attributes
            )
        old_inputs = list(producer.inputs) + list(plan.add.inputs)
        ir.convenience.replace_nodes_and_values(
            graph, plan.add, [producer, plan.add], [replacement], [plan.add.outputs[0]], [replacement.outputs[0]]
        )
        drop_unused_initializers(old_inputs)
        logger.debug("merged Add %s into %s %s", plan.add.name, producer.op_type, producer.name)

    @staticmethod
    def _node(producer: ir.Node, op_type: str, inputs: list[ir.Value | None], attributes) -> ir.Node:
        return ir.Node(
            "",
            op_type,
            inputs,
            attributes=attributes,
            name=producer.name,
            version=producer.version if op_type == producer.op_type else None,
            doc_string=producer.doc_string,
        )

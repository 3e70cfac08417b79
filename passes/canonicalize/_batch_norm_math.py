"""The inference BatchNormalization as a per-channel affine map, and the one "can it fold?" predicate.

Not a pass (the leading underscore keeps the catalog from importing it as one): FoldBatchNorm and
DecomposeBatchNorm share it, so that DecomposeBatchNorm leaves alone exactly the BatchNorms that FoldBatchNorm
would fold, and share its BatchNormRewrite (match every default-domain BatchNormalization, check by a planner).

Inference BatchNormalization over channel axis 1, for channel c::

    y = gamma[c] * (x - mean[c]) / sqrt(var[c] + epsilon) + beta[c]
      = s[c] * x + t[c],     s = gamma / sqrt(var + epsilon),     t = beta - mean * s

computed in float64. A producer that ends in a per-output-channel weight W and bias b absorbs it as
``W' = W * s`` (on the output-channel axis) and ``b' = (b - mean) * s + beta = b * s + t``.

Which producers can absorb it (channel axis 1 of the BatchNorm input must be the producer's output-channel axis):

- Conv (any group, 1-D/2-D/3-D): weight (C_out, C_in/group, k...), output channel = weight axis 0;
- ConvTranspose: weight (C_in, C_out/group, k...); output channel ``g * C_out/group + j`` for weight row i in
  group ``g = i // (C_in/group)`` and column j;
- Gemm: output (M, N), channel = N = column of op(B) (``transB`` picks B's axis);
- MatMul with a 2-D constant weight (K, N) on a 2-D input, optionally followed by an Add of a constant bias:
  output (M, N), channel = N. A MatMul on a 3-D input puts the channel axis 1 on M-like data, not on N: refused.
"""

from __future__ import annotations

import abc
import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.passes._rewrite_support import (
    constant_array,
    constant_refusal,
    dtype_refusal,
    known_rank_and_dtype,
    same_graph_refusal,
    sole_consumer_refusal,
)
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass

logger = logging.getLogger(__name__)

#: Producers a BatchNorm can fold into.
FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class BatchNormAffine:
    """The map ``y = scale * x + shift`` (float64, one entry per channel) of an inference BatchNormalization."""

    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """A BatchNorm and the producer (plus, for MatMul, the optional bias Add) that will absorb it."""

    batch_norm: ir.Node
    producer: ir.Node
    bias_add: ir.Node | None
    affine: BatchNormAffine


def batch_norm_affine(node: ir.Node) -> BatchNormAffine | str:
    """The affine map of an inference BatchNormalization, or the reason it is not one that can be rewritten."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return "not an ONNX BatchNormalization"
    if node.attributes.get_int("training_mode", 0) != 0:
        return "BatchNormalization is in training mode (training_mode=1)"
    if "is_test" in node.attributes and node.attributes.get_int("is_test", 0) == 0:
        return "BatchNormalization is in training mode (is_test=0)"
    if node.attributes.get_int("spatial", 1) == 0:
        return "BatchNormalization is not spatial (spatial=0: statistics per activation, not per channel)"
    # Before opset 14 the extra outputs (running and saved statistics) are what selects training mode, and with
    # training_mode they are the updated statistics: either way, a BatchNorm that declares them is not a pure
    # inference map. Refuse rather than guess.
    if any(output.name for output in node.outputs[1:]):
        return "BatchNormalization has more than one output (training-mode statistics)"
    if len(node.inputs) != 5 or node.inputs[0] is None:
        return "BatchNormalization does not have its five inputs"
    parameters = []
    for role, value in zip(("scale", "bias", "mean", "var"), node.inputs[1:]):
        reason = constant_refusal(value, f"BatchNormalization {role}") or dtype_refusal(
            value, f"BatchNormalization {role}"
        )
        if reason is not None:
            return reason
        parameters.append(np.asarray(constant_array(value), dtype=np.float64))
    gamma, beta, mean, variance = parameters
    if gamma.ndim != 1 or any(parameter.shape != gamma.shape for parameter in parameters):
        shapes = ", ".join(str(parameter.shape) for parameter in parameters)
        return f"BatchNormalization parameters are not vectors of one length (shapes {shapes})"
    epsilon = float(node.attributes.get_float("epsilon", 1e-5))
    denominator = variance + epsilon
    if not np.all(denominator > 0) or not np.all(np.isfinite(parameters)):
        return "BatchNormalization variance + epsilon is not positive and finite for every channel"
    scale = gamma / np.sqrt(denominator)
    shift = beta - mean * scale
    return BatchNormAffine(scale=scale, shift=shift)


def plan_fold(node: ir.Node) -> FoldPlan | str:
    """How FoldBatchNorm would fold BatchNorm ``node`` into its producer, or the reason it cannot.

    Weights shared with other nodes do not block a fold: the folded weights are always written as new
    initializers, so another reader keeps the original.
    """
    affine = batch_norm_affine(node)
    if isinstance(affine, str):
        return affine
    activation = node.inputs[0]
    producer = activation.producer()
    if producer is None:
        return f"its input {activation.name!r} has no producer (a graph input or a constant)"
    if producer.domain not in ("", "ai.onnx"):
        return f"its producer {producer.domain}::{producer.op_type} cannot absorb a BatchNorm"
    reason = same_graph_refusal(producer, node) or sole_consumer_refusal(
        activation, f"the {producer.op_type} output", node
    )
    if reason is not None:
        return reason
    bias_add = None
    if producer.op_type == "Add":
        matmul, reason = _matmul_under_bias_add(producer)
        if matmul is None:
            return reason
        bias_add, producer = producer, matmul
    if producer.op_type not in FOLDABLE_PRODUCERS:
        return f"its producer {producer.op_type} cannot absorb a BatchNorm"
    check = {
        "Conv": _conv_refusal,
        "ConvTranspose": _conv_transpose_refusal,
        "Gemm": _gemm_refusal,
        "MatMul": _matmul_refusal,
    }[producer.op_type]
    reason = check(producer, affine.channels, bias_add)
    if reason is not None:
        return reason
    return FoldPlan(batch_norm=node, producer=producer, bias_add=bias_add, affine=affine)




def matmul_bias_operand(add: ir.Node) -> tuple[ir.Node | None, ir.Value | None]:
    """For ``Add(MatMul(...), bias)`` in either operand order: the MatMul and the bias value."""
    if len(add.inputs) != 2 or any(value is None for value in add.inputs):
        return None, None
    for position in (0, 1):
        candidate = add.inputs[position].producer()
        if candidate is not None and candidate.op_type == "MatMul" and candidate.domain in ("", "ai.onnx"):
            return candidate, add.inputs[1 - position]
    return None, None


def _matmul_under_bias_add(add: ir.Node) -> tuple[ir.Node | None, str | None]:
    matmul, bias = matmul_bias_operand(add)
    if matmul is None:
        return None, "its producer Add is not a MatMul plus a constant bias"
    reason = (
        same_graph_refusal(matmul, add)
        or sole_consumer_refusal(matmul.outputs[0], "the MatMul output", add)
        or constant_refusal(bias, "bias of the Add after MatMul")
        or dtype_refusal(bias, "bias of the Add after MatMul")
    )
    return (None, reason) if reason is not None else (matmul, None)


def _constant_shape(value: ir.Value) -> tuple[int, ...]:
    """The shape of a constant, read without loading its data."""
    return tuple(value.const_value.shape)


def _weight_refusal(producer: ir.Node, index: int, role: str) -> str | None:
    if len(producer.inputs) <= index or producer.inputs[index] is None:
        return f"{producer.op_type} has no {role}"
    value = producer.inputs[index]
    return constant_refusal(value, f"{producer.op_type} {role}") or dtype_refusal(value, f"{producer.op_type} {role}")


def _weight_shape(producer: ir.Node, role: str, rank: int, *, or_more: bool = False) -> tuple[int, ...] | str:
    """The shape of ``producer``'s constant weight (input 1, called ``role``) of rank ``rank`` (or more), or why not."""
    reason = _weight_refusal(producer, 1, role)
    if reason is not None:
        return reason
    shape = _constant_shape(producer.inputs[1])
    if len(shape) < rank or (len(shape) > rank and not or_more):
        return f"{producer.op_type} {role} has rank {len(shape)}, expected {rank}{' or more' if or_more else ''}"
    return shape


def _optional_bias_refusal(producer: ir.Node, index: int, shape: tuple[int, ...]) -> str | None:
    if len(producer.inputs) <= index or producer.inputs[index] is None:
        return None
    reason = _weight_refusal(producer, index, "bias")
    if reason is not None:
        return reason
    bias_shape = _constant_shape(producer.inputs[index])
    if bias_shape != shape:
        return f"{producer.op_type} bias has shape {bias_shape}, expected {shape}"
    return None


def _conv_refusal(conv: ir.Node, channels: int, bias_add: ir.Node | None) -> str | None:
    weight_shape = _weight_shape(conv, "weight", 3, or_more=True)
    if isinstance(weight_shape, str):
        return weight_shape
    if weight_shape[0] != channels:
        return f"Conv has {weight_shape[0]} output channels but the BatchNorm has {channels}"
    return _optional_bias_refusal(conv, 2, (channels,))


def _conv_transpose_refusal(conv: ir.Node, channels: int, bias_add: ir.Node | None) -> str | None:
    weight_shape = _weight_shape(conv, "weight", 3, or_more=True)
    if isinstance(weight_shape, str):
        return weight_shape
    group = conv.attributes.get_int("group", 1)
    if group < 1 or weight_shape[0] % group != 0:
        return f"ConvTranspose weight has {weight_shape[0]} input channels, not a multiple of group={group}"
    if weight_shape[1] * group != channels:
        return f"ConvTranspose has {weight_shape[1] * group} output channels but the BatchNorm has {channels}"
    return _optional_bias_refusal(conv, 2, (channels,))


def _gemm_refusal(gemm: ir.Node, channels: int, bias_add: ir.Node | None) -> str | None:
    weight_shape = _weight_shape(gemm, "B", 2)
    if isinstance(weight_shape, str):
        return weight_shape
    columns = weight_shape[0] if gemm.attributes.get_int("transB", 0) else weight_shape[1]
    if columns != channels:
        return f"Gemm has {columns} output features but the BatchNorm has {channels}"
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        reason = _weight_refusal(gemm, 2, "C")
        if reason is not None:
            return reason
        bias_shape = _constant_shape(gemm.inputs[2])
        if len(bias_shape) > 2 or (bias_shape and bias_shape[-1] not in (1, channels)):
            return f"Gemm C has shape {bias_shape}, which does not broadcast to (M, {channels})"
    return None


def _matmul_refusal(matmul: ir.Node, channels: int, bias_add: ir.Node | None) -> str | None:
    weight_shape = _weight_shape(matmul, "weight", 2)  # only a 2-D constant weight folds
    if isinstance(weight_shape, str):
        return weight_shape
    rank, _ = known_rank_and_dtype(matmul.inputs[0])
    if rank != 2:
        shown = "unknown" if rank is None else str(rank)
        return (
            f"MatMul input has rank {shown}: only on a 2-D input is BatchNormalization's channel axis (1) the "
            "MatMul's last (output-feature) axis"
        )
    if weight_shape[1] != channels:
        return f"MatMul has {weight_shape[1]} output features but the BatchNorm has {channels}"
    if bias_add is not None:
        _, bias_value = matmul_bias_operand(bias_add)
        bias_shape = _constant_shape(bias_value)
        if not is_row_bias(bias_shape, channels):
            return f"the Add after MatMul has a constant of shape {bias_shape}, not a ({channels},) bias"
    return None


def is_row_bias(shape: tuple[int, ...], features: int) -> bool:
    """True when a constant of ``shape`` added to an (M, features) matrix is a per-feature bias of that shape.

    The constant broadcasts from the right: ``()``, ``(1,)``, ``(features,)``, ``(1, 1)`` and ``(1, features)``
    leave the (M, features) result shape unchanged and add the same value to every row.
    """
    if len(shape) > 2:
        return False
    padded = (1,) * (2 - len(shape)) + tuple(shape)
    return padded[0] == 1 and padded[1] in (1, features)


class BatchNormRewrite(RewritePass):
    """A CANONICALIZE rewrite of inference BatchNormalization nodes; ``plan`` decides what to write or refuses."""

    phase = Phase.CANONICALIZE

    @abc.abstractmethod
    def plan(self, batch_norm: ir.Node) -> object | str:
        """What ``rewrite`` needs for ``batch_norm``, or the reason it is left alone."""

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            return node
        return None

    def check(self, match: ir.Node, context: RewriteContext) -> object | Refusal:
        plan = self.plan(match)
        return Refusal(plan) if isinstance(plan, str) else plan

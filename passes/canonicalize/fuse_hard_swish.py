"""FuseHardSwish: fuse a HardSwish written out node by node into one HardSwish (opset 14).

    HardSwish(x) = x · max(0, min(1, x/6 + 1/2)) = x · ReLU6(x + 3) / 6 = x · HardSigmoid(x; α = 1/6, β = 1/2)

Recognised spellings (constants within a relative 1e-4; operands of Add and Mul in either order):

- torch.onnx below opset 14: ``Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))`` (HardSigmoid's defaults, α = 0.2,
  are Keras' hard_sigmoid, another function, and are refused);
- Keras/tf2onnx (MobileNetV3's ``x * relu6(x + 3) / 6``): ``Add(x, 3)`` → ReLU6 → ``Div(·, 6)`` or ``Mul(·, 1/6)``
  → ``Mul(x, ·)``, or the product first and the division after; ReLU6 as ``Clip(·, 0, 6)`` (bounds as inputs or,
  before opset 11, attributes), ``Min(Max(·, 0), 6)``, ``Max(Min(·, 6), 0)`` or ``Min(Relu(·), 6)``.

HardSwish exists from opset 14; a model below it is refused with an OpsetRefusal, which UpgradeOpsetForFusions
acts on. onnxruntime 1.19.2 runs HardSwish in float (no integer kernel; the annotator keeps it FP32 between its
quantized neighbours, the way it keeps the decomposed Mul of two activations quantized on both sides).
The fused kernel computes the same piecewise-linear function; the result matches to float32 rounding (the division
by 6 and the product are ordered differently).

Refused (logged): a constant outside the tolerance, a non-constant bound, an intermediate value read elsewhere or
that is a graph output (fan-out), an element type other than float32, a function body.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qgraph.passes._rewrite_support import constant_array, known_rank_and_dtype
from qgraph.passes.canonicalize._pattern_matching import (
    AnalysedFusion,
    FusedChain,
    FusionRefused,
    OpsetRefusal,
    close_to,
    default_opset,
    is_op,
    other_operand,
    private_value_refusal,
    replace_chain,
    scalar_constant,
    sole_consumer,
    split_constant_operand,
)
from qgraph.passes.infrastructure import Refusal, RewriteContext, register

logger = logging.getLogger(__name__)

MINIMUM_OPSET = 14
CONSTANT_TOLERANCE = 1e-4


@register
class FuseHardSwish(AnalysedFusion):
    """Fuse x·HardSigmoid(x) and x·ReLU6(x+3)/6 spellings into HardSwish (opset >= 14)."""

    summary = "Fuse x·HardSigmoid(x, 1/6, 1/2) and x·ReLU6(x+3)/6 into HardSwish (opset >= 14)"
    fused = "HardSwish"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        """A HardSigmoid, or an ``Add(x, 3)`` that feeds a ReLU6 spelling."""
        if is_op(node, "HardSigmoid"):
            return node
        if is_op(node, "Add"):
            split = split_constant_operand(node)
            reader = sole_consumer(node.outputs[0])
            if split is not None and close_to(scalar_constant(split[1]), 3.0, CONSTANT_TOLERANCE) and is_op(
                    reader, "Clip", "Max", "Min", "Relu"):
                return node
        return None

    def analyse(self, match: ir.Node, context: RewriteContext) -> FusedChain | Refusal:
        if match.op_type == "HardSigmoid":
            plan = self._hard_sigmoid(match)
        else:
            plan = self._relu6(match, context)
        rank, dtype = known_rank_and_dtype(plan.data)
        if dtype is not None and dtype != ir.DataType.FLOAT:
            raise FusionRefused(f"element type {dtype.name}: only float32 is fused")
        for node in plan.nodes:
            for value in node.inputs[1:]:
                array = constant_array(value)
                if array is not None and ((rank is None and array.ndim > 0)
                                          or (rank is not None and array.ndim > rank)):
                    raise FusionRefused(f"the constant {value.name!r} could broadcast the output")
        for node in plan.nodes:
            for value in node.outputs:
                if value is plan.output:
                    continue
                readers = [use.node for use in value.uses() if any(use.node is member for member in plan.nodes)]
                refusal = private_value_refusal(value, readers, f"{node.op_type} output")
                if refusal:
                    raise FusionRefused(refusal)
        opset = default_opset(context.model)
        if opset < MINIMUM_OPSET:
            return OpsetRefusal(f"HardSwish needs opset {MINIMUM_OPSET}, the model imports {opset}", MINIMUM_OPSET)
        return plan

    def rewrite(self, plan: FusedChain, context: RewriteContext) -> None:
        graph = plan.output.producer().graph
        fused = ir.Node("", "HardSwish", [plan.data], name=context.names.fresh(f"{plan.output.name or 'x'}_hard_swish"))
        replace_chain(graph, plan.nodes, plan.output, fused)
        logger.debug("fused %d nodes into HardSwish %s", len(plan.nodes), fused.name)

    # -- spellings -----------------------------------------------------------------------------------------------
    def _hard_sigmoid(self, node: ir.Node) -> FusedChain:
        alpha = node.attributes.get("alpha")
        beta = node.attributes.get("beta")
        alpha = alpha.as_float() if alpha is not None else 0.2
        beta = beta.as_float() if beta is not None else 0.5
        if not close_to(alpha, 1.0 / 6.0, CONSTANT_TOLERANCE) or not close_to(beta, 0.5, CONSTANT_TOLERANCE):
            raise FusionRefused(f"HardSigmoid(alpha={alpha:g}, beta={beta:g}) is not HardSwish's (1/6, 1/2)")
        data = node.inputs[0]
        product = sole_consumer(node.outputs[0])
        if not is_op(product, "Mul") or other_operand(product, node.outputs[0]) is not data:
            raise FusionRefused("HardSigmoid(x) is not multiplied (alone) by x")
        return FusedChain(data, product.outputs[0], (node, product))

    def _relu6(self, add: ir.Node, context: RewriteContext) -> FusedChain:
        data = split_constant_operand(add)[0]
        nodes = [add]
        clipped = self._clip_zero_six(add.outputs[0], nodes, context)
        reader = sole_consumer(clipped)
        if _is_sixth(reader, clipped):
            nodes.append(reader)
            scaled = reader.outputs[0]
            product = sole_consumer(scaled)
            if not is_op(product, "Mul") or other_operand(product, scaled) is not data:
                raise FusionRefused("ReLU6(x + 3) / 6 is not multiplied (alone) by x")
            nodes.append(product)
            return FusedChain(data, product.outputs[0], tuple(nodes))
        if is_op(reader, "Mul") and other_operand(reader, clipped) is data:
            nodes.append(reader)
            divide = sole_consumer(reader.outputs[0])
            if not _is_sixth(divide, reader.outputs[0]):
                raise FusionRefused("x · ReLU6(x + 3) is not divided by 6")
            nodes.append(divide)
            return FusedChain(data, divide.outputs[0], tuple(nodes))
        raise FusionRefused("ReLU6(x + 3) is neither divided by 6 nor multiplied by x")

    def _clip_zero_six(self, value: ir.Value, nodes: list[ir.Node], context: RewriteContext) -> ir.Value:
        """Follow a ReLU6 spelling from ``value``; returns its output and appends its nodes."""
        first = sole_consumer(value)
        if is_op(first, "Clip"):
            low, high = _clip_bounds(first, default_opset(context.model))
            if low != 0.0 or not close_to(high, 6.0, CONSTANT_TOLERANCE):
                raise FusionRefused(f"Clip({low}, {high}) is not ReLU6")
            nodes.append(first)
            return first.outputs[0]
        bounds = {"Max": 0.0, "Min": 6.0}
        if is_op(first, "Relu"):
            second = sole_consumer(first.outputs[0])
            if not is_op(second, "Min") or _bound(second, first.outputs[0]) is None or not close_to(
                    _bound(second, first.outputs[0]), 6.0, CONSTANT_TOLERANCE):
                raise FusionRefused("Relu(x + 3) is not followed by Min(·, 6)")
            nodes += [first, second]
            return second.outputs[0]
        if is_op(first, "Max", "Min"):
            other = "Min" if first.op_type == "Max" else "Max"
            second = sole_consumer(first.outputs[0])
            if not is_op(second, other):
                raise FusionRefused(f"{first.op_type} after x + 3 is not followed by {other}")
            for node, source in ((first, value), (second, first.outputs[0])):
                bound = _bound(node, source)
                expected = bounds[node.op_type]
                if bound is None or not (bound == expected or close_to(bound, expected, CONSTANT_TOLERANCE)):
                    raise FusionRefused(f"{node.op_type} bound {bound!r} is not ReLU6's {expected:g}")
            nodes += [first, second]
            return second.outputs[0]
        raise FusionRefused("x + 3 does not go into a ReLU6")


def _bound(node: ir.Node, value: ir.Value) -> float | None:
    """The one-element constant a binary Max/Min compares ``value`` with."""
    split = split_constant_operand(node) if len(node.inputs) == 2 else None
    if split is None or split[0] is not value:
        return None
    return scalar_constant(split[1])


def _clip_bounds(node: ir.Node, opset: int) -> tuple[float | None, float | None]:
    if opset < 11:
        low, high = node.attributes.get("min"), node.attributes.get("max")
        return (low.as_float() if low is not None else None, high.as_float() if high is not None else None)
    inputs = list(node.inputs) + [None, None]
    return scalar_constant(inputs[1]), scalar_constant(inputs[2])


def _is_sixth(node: ir.Node | None, value: ir.Value) -> bool:
    """``node`` is ``Div(value, 6)`` or ``Mul(value, 1/6)``."""
    if is_op(node, "Div") and len(node.inputs) == 2 and node.inputs[0] is value:
        return close_to(scalar_constant(node.inputs[1]), 6.0, CONSTANT_TOLERANCE)
    if is_op(node, "Mul"):
        split = split_constant_operand(node)
        return split is not None and split[0] is value and close_to(scalar_constant(split[1]), 1.0 / 6.0,
                                                                     CONSTANT_TOLERANCE)
    return False

"""FuseQuickGelu: fuse ``x · Sigmoid(α·x)`` — SiLU/Swish (α = 1) and the sigmoid approximation of GELU
(α = 1.702, Hendrycks & Gimpel) — into one com.microsoft ``QuickGelu(x; alpha=α)``.

    QuickGelu(x; α) = x · σ(α·x),   σ(t) = 1 / (1 + e^(−t))

SiLU(x) = x · σ(x) is QuickGelu with α = 1 (torch.onnx below opset 24 and tf2onnx write ``Mul(x, Sigmoid(x))``;
Keras' swish the same), and ``x · σ(1.702 x)`` (CLIP's QuickGELU, flax's ``approximate`` sigmoid forms) is
``Mul(x, Sigmoid(Mul(x, 1.702)))``; any positive α (Swish-β) is accepted, operands of the Muls in either order.

No default-domain operator computes it in the opsets onnxruntime 1.19.2 loads (Swish arrives in opset 24), and
``com.microsoft::QuickGelu`` runs there at any opset (measured: opset 13–21, alpha 1 and 1.702, max difference
to the decomposed graph 1.2e-7). The fused node is one operator for annotation: it stays FP32 between a quantized
producer and reader.

SiLU (α = 1) is left decomposed unless ``fuse_silu=True``: for it the decomposed pair quantizes better. Measured on
a 5-layer Conv/SiLU/depthwise stack (64×64 input, minmax int8, QOperator, onnxruntime 1.19.2 on the 2-core AMD
EPYC Zen 4, one thread, batch 1, two runs): ``x · Sigmoid(x)`` lowers to QLinearSigmoid + QLinearMul, 31.85 dB and
436/463 µs; fused, the FP32 QuickGelu islands give 31.40 dB and 491/656 µs (FP32: 1878/1233 µs). With α = 1.702
the decomposed form has a float ``Mul(x, 1.702)`` between DQ and Q, and fusing wins: 29.31 → 29.95 dB at
1632/1262 → 941/1278 µs.

Refused (logged): α not a one-element float32 constant, α ≤ 0 or non-finite, a Sigmoid output or α·x read by
another node or a graph output (fan-out), an element type other than float32, a function body.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import onnx_ir as ir

from qgraph.passes._rewrite_support import constant_array, known_rank_and_dtype
from qgraph.passes.canonicalize._pattern_matching import (
    MICROSOFT_DOMAIN,
    FusedChain,
    ensure_microsoft_domain,
    is_op,
    other_operand,
    private_value_refusal,
    replace_chain,
    scalar_constant,
    split_constant_operand,
)
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QuickGeluPlan(FusedChain):
    alpha: float


@register
class FuseQuickGelu(RewritePass):
    """Fuse x · Sigmoid(α·x) (SiLU, sigmoid-GELU, Swish-β) into com.microsoft QuickGelu."""

    phase = Phase.CANONICALIZE
    summary = "Fuse x·Sigmoid(1.702x) (and, with fuse_silu, x·Sigmoid(x)) into com.microsoft QuickGelu"

    def __init__(self, *, fuse_silu: bool = False) -> None:
        super().__init__()
        self.fuse_silu = fuse_silu

    def match(self, node: ir.Node, context: RewriteContext) -> tuple[ir.Node, ir.Node, ir.Value] | None:
        """``Mul(x, Sigmoid(·))``: the product, the Sigmoid and x (SiLU only with ``fuse_silu``)."""
        if not is_op(node, "Mul") or len(node.inputs) != 2 or any(value is None for value in node.inputs):
            return None
        for sigmoid_output in node.inputs:
            sigmoid = sigmoid_output.producer()
            if is_op(sigmoid, "Sigmoid"):
                data = other_operand(node, sigmoid_output)
                argument = sigmoid.inputs[0]
                scaled = _scaled_of(argument, data) if argument is not data else None
                silu = argument is data or (scaled is not None and scalar_constant(
                    other_operand(scaled, data)) == 1.0)
                if (argument is data or scaled is not None) and (self.fuse_silu or not silu):
                    return node, sigmoid, data
        return None

    def check(self, match: tuple[ir.Node, ir.Node, ir.Value], context: RewriteContext) -> QuickGeluPlan | Refusal:
        product, sigmoid, data = match
        if not isinstance(product.graph, ir.Graph):
            return Refusal("x · Sigmoid(αx) inside a function body")
        _, dtype = known_rank_and_dtype(data)
        if dtype is not None and dtype != ir.DataType.FLOAT:
            return Refusal(f"element type {dtype.name}: only float32 is fused")
        nodes = [sigmoid, product]
        alpha = 1.0
        argument = sigmoid.inputs[0]
        if argument is not data:
            scale = _scaled_of(argument, data)
            constant = constant_array(scale.inputs[0] if scale.inputs[0] is not data else scale.inputs[1])
            if str(constant.dtype) != "float32":
                return Refusal(f"α has element type {constant.dtype}, not float32")
            alpha = float(constant.reshape(()))
            if not math.isfinite(alpha) or alpha <= 0:
                return Refusal(f"α = {alpha!r} is not a positive number")
            rank, _ = known_rank_and_dtype(data)
            if (rank is None and constant.ndim > 0) or (rank is not None and constant.ndim > rank):
                return Refusal("α has a rank that could broadcast the output")
            refusal = private_value_refusal(argument, [sigmoid], "α·x")
            if refusal:
                return Refusal(refusal)
            nodes.insert(0, scale)
        refusal = private_value_refusal(sigmoid.outputs[0], [product], "Sigmoid output")
        if refusal:
            return Refusal(refusal)
        return QuickGeluPlan(data, product.outputs[0], tuple(nodes), alpha)

    def rewrite(self, plan: QuickGeluPlan, context: RewriteContext) -> None:
        graph = plan.output.producer().graph
        ensure_microsoft_domain(context.model)
        base = plan.output.name or "quick_gelu"
        fused = ir.Node(MICROSOFT_DOMAIN, "QuickGelu", [plan.data], attributes=[ir.AttrFloat32("alpha", plan.alpha)],
                        name=context.names.fresh(f"{base}_quick_gelu"))
        replace_chain(graph, plan.nodes, plan.output, fused)
        logger.debug("fused x·Sigmoid(%g·x) into QuickGelu %s", plan.alpha, fused.name)


def _scaled_of(value: ir.Value, data: ir.Value) -> ir.Node | None:
    """The ``Mul(data, α)`` (either order, α a one-element constant) producing ``value``, else ``None``."""
    producer = value.producer()
    if not is_op(producer, "Mul"):
        return None
    split = split_constant_operand(producer)
    if split is None or split[0] is not data or scalar_constant(split[1]) is None:
        return None
    return producer

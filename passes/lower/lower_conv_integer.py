"""LowerConvInteger: ``DQ(x), DQ(Wq), [DQ(bq)] → Conv → float y`` (y not quantized) becomes
``ConvInteger(xq, Wu8, zx, zw) → Cast(float) → Mul(sx·sw) [→ Add(b)]``.

With ``x = (xq - zx)·sx`` (uint8 per tensor) and ``W = (Wq - zw)·sw[o]`` (per tensor or per output channel):

    y[o] = sx·sw[o] · Σ (xq - zx)(Wq[o] - zw) + b[o] = sx·sw[o] · acc[o] + b[o]

with ``acc`` exact in int32, so y matches the QDQ graph to float precision (``b`` is the dequantized bias, added in
float). onnxruntime 1.19.2 implements ConvInteger only for uint8 x with **uint8** W and a **scalar** W zero point
(verified: int8 W gives NOT_IMPLEMENTED, a per-channel zero point "Non per-tensor quantization is not supported
now"). So int8 weights are stored as ``Wu8 = Wq + 128`` with ``zw + 128`` — the same real weights — which also
avoids the u8·s8 saturation on AVX2 — and per-channel weights are accepted only when all channels share one zero
point (the contract's symmetric weights do: all zeros). Per-channel scales live in the float Mul, shaped ``[O, 1,
…]`` to broadcast over the spatial axes.

A Conv whose only reader is a Q (possibly through Relu/Clip) is left to LowerQLinearConv.

Refused (logged): x not uint8 per tensor, non-constant params/weight/bias, per-channel on an axis other than 0,
weight zero points that differ across channels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import QuantizedOperandsLowering


@dataclasses.dataclass(frozen=True)
class _ConvIntegerPlan:
    """An accepted Conv: its input and weight quantization, the uint8 weight and the float bias (if any)."""

    conv: ir.Node
    input_params: qdq.QuantParams
    weight_params: qdq.QuantParams
    weight: qdq.KernelWeight
    bias: np.ndarray | None


@register
class LowerConvInteger(QuantizedOperandsLowering):
    """Lower a QDQ Conv whose output stays float to ConvInteger and a float rescale."""

    phase = Phase.LOWER
    summary = "DQ → Conv → float becomes ConvInteger → Cast → Mul(scale) → Add(bias)"
    op_type = "Conv"
    float_output_only = True

    def check(self, conv: ir.Node, context: RewriteContext) -> _ConvIntegerPlan | Refusal:
        operands = qdq.conv_operands(conv, "ConvInteger")
        if isinstance(operands, str):
            return Refusal(operands)
        input_params, weight_params, weight_array = operands
        weight = qdq.kernel_weight(weight_params, guard_saturation=True, force_uint8=True)
        if isinstance(weight, str):
            return Refusal(weight)
        bias = None
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            bias = qdq.constant_float(conv.inputs[2])
            if isinstance(bias, str):
                return Refusal(f"bias: {bias}")
            if bias.ndim != 1 or bias.size != weight_array.shape[0]:
                return Refusal(f"the bias has shape {bias.shape}, not [{weight_array.shape[0]}]")
        return _ConvIntegerPlan(conv, input_params, weight_params, weight, bias)

    def rewrite(self, plan: _ConvIntegerPlan, context: RewriteContext) -> None:
        conv = plan.conv
        graph = conv.graph
        base = conv.name or "conv"
        weight_array = plan.weight.weight
        weight_value = qdq.existing_or_new_constant(
            graph, context.names, plan.weight_params.integer_value, weight_array, f"{base}_weight_uint8", before=conv
        )
        zero_point = qdq.add_constant(
            graph, context.names, f"{base}_weight_zero_point", plan.weight.zero_point.reshape(-1)[:1].reshape(()),
            before=conv,
        )
        integer = ir.Node(
            "", "ConvInteger",
            [plan.input_params.integer_value, weight_value, plan.input_params.zero_point, zero_point],
            qdq.copy_attributes(conv), name=f"{base}_integer",
        )
        channels, spatial_rank = weight_array.shape[0], weight_array.ndim - 2
        scale = np.float64(plan.input_params.scalar_scale()) * np.broadcast_to(
            plan.weight_params.scale_array.astype(np.float64).reshape(-1), (channels,)
        )
        broadcast_shape = (channels,) + (1,) * spatial_rank
        bias = None if plan.bias is None else plan.bias.reshape(broadcast_shape)
        nodes = [integer, *qdq.rescale_nodes(
            graph, context.names, integer.outputs[0], scale.reshape(broadcast_shape), bias, before=conv, base_name=base
        )]
        qdq.replace_float_op(conv, nodes)

"""LowerQLinearConv: ``DQ(x), DQ(Wq), [DQ(bq)] → Conv → [Relu | Clip] → Q(y)`` becomes one ``QLinearConv``.

With ``x = (xq - zx)·sx`` (uint8, per tensor), ``W = (Wq - zw)·sw[o]`` (int8, per tensor or per output channel,
axis 0) and ``b = bq·sx·sw[o]`` (int32), the Conv output is

    conv(x, W)[o] + b[o] = sx·sw[o] · ( Σ (xq - zx)(Wq[o] - zw[o]) + bq[o] ) = sx·sw[o] · acc[o]

and ``Q(y) = saturate(round(sx·sw[o]/sy · acc[o]) + zy)``, which is what
``QLinearConv(xq, sx, zx, Wq, sw, zw, sy, zy, bq)`` computes with the exact integer accumulator ``acc``. The only
difference from the QDQ graph is where the float rounding happens (at most one output step).

A bias whose DQ scale is not ``sx·sw`` (or a float constant bias) is requantized to int32 in that scale
(``round(b / (sx·sw))``, an error of at most half an accumulator step).

Relu/Clip between Conv and Q are fused when implied by the output range (``Q(clip(v, lo, hi)) = Q(v)`` for all v
exactly when ``round(lo/sy) + zy <= 0`` and ``round(hi/sy) + zy >= 255``; for Relu: ``zy == 0``), else refused.

Weights: onnxruntime 1.19.2's QLinearConv takes uint8 x with int8 or uint8 W and per-channel ``w_scale``. On AVX2
without VNNI int8 weights with ``|Wq| > 64`` could saturate the u8·s8 kernel, so they are stored as uint8 (``Wq +
128``, zero point ``zw + 128``, exactly the same real weights) unless ``guard_saturation=False``.

Refused (logged): non-constant params or weight, activations not uint8, output not uint8 per tensor, per-channel
weights on an axis other than 0, non-uniform weight zero points, the float Conv output (or the activation's) read by
anything other than the one Q or being a graph output, a bias that does not fit int32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.passes.infrastructure import Refusal, RewriteContext, register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import WeightLowering


@dataclasses.dataclass(frozen=True)
class _ConvPlan:
    """An accepted Conv island: input, weight and output quantization, the kernel's weight and the int32 bias
    (``bias_unchanged``: the stored int32 tensor as it is)."""

    conv: ir.Node
    input_params: qdq.QuantParams
    weight_params: qdq.QuantParams
    output: qdq.OutputQuantize
    weight: qdq.KernelWeight
    bias: np.ndarray | None
    bias_unchanged: bool


@register
class LowerQLinearConv(WeightLowering):
    """Lower a QDQ Conv island (with an implied Relu/Clip) to QLinearConv."""

    summary = "DQ → Conv → [Relu|Clip] → Q becomes QLinearConv (per-channel weights, bias int32)"
    op_type = "Conv"

    def check(self, conv: ir.Node, context: RewriteContext) -> _ConvPlan | Refusal:
        if not qdq.output_is_quantized_only(conv.outputs[0]):
            return Refusal(
                "the Conv output is read as float (a graph output or a non-Q consumer); LowerConvInteger owns it"
            )
        operands = qdq.conv_operands(conv, "QLinearConv")
        if isinstance(operands, str):
            return Refusal(operands)
        input_params, weight_params, weight_array = operands
        output_channels = weight_array.shape[0]
        output = qdq.output_quantize(conv.outputs[0])
        if output is None or isinstance(output, str):
            return Refusal(output or "the Conv output is not quantized")
        weight = qdq.kernel_weight(weight_params, guard_saturation=self.guard_saturation)
        if isinstance(weight, str):
            return Refusal(weight)
        bias, bias_unchanged = None, False
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            accumulator_scale = np.broadcast_to(
                input_params.scalar_scale() * weight_params.scale_array.astype(np.float64).reshape(-1),
                (output_channels,),
            )
            stored = qdq.bias_as_int32(conv.inputs[2], accumulator_scale)
            if isinstance(stored, str):
                return Refusal(stored)
            bias, bias_unchanged = stored
        return _ConvPlan(conv, input_params, weight_params, output, weight, bias, bias_unchanged)

    def rewrite(self, plan: _ConvPlan, context: RewriteContext) -> None:
        conv, output = plan.conv, plan.output
        graph = conv.graph
        weight_params, weight = plan.weight_params, plan.weight
        anchor = output.quantize
        weight_value, weight_zero_point = qdq.operand_values(
            graph, context.names, qdq.MatMulOperand(weight_params, weight), before=anchor
        )
        inputs = [
            *qdq.quantized_triple(graph, context.names, plan.input_params, before=anchor),
            weight_value, weight_params.scale, weight_zero_point,
            *qdq.scale_and_zero_point(graph, context.names, output.params, before=anchor),
        ]
        if plan.bias is not None:
            bias_producer = qdq.dequantize_of(conv.inputs[2])
            if plan.bias_unchanged:
                inputs.append(bias_producer.inputs[0])
            else:
                inputs.append(qdq.add_constant(
                    graph, context.names, f"{conv.name or 'conv'}_bias_int32", plan.bias, before=anchor
                ))
        lowered = ir.Node("", "QLinearConv", inputs, qdq.copy_attributes(conv), name=qdq.derived_name(conv, "quant"))
        qdq.replace_island(context.model, conv, output, lowered)


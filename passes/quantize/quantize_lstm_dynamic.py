"""QuantizeLSTMDynamic: run planned LSTMs as onnxruntime's ``com.microsoft::DynamicQuantizeLSTM``.

Recurrent layers stay FP32 unless ``--quantize-recurrent dynamic`` asks for this. DynamicQuantizeLSTM (onnxruntime
contrib operator, opset 1 of ``com.microsoft``) takes the inputs of ``ai.onnx::LSTM`` followed by the weight
quantization parameters (schema in onnxruntime's ``quantization_defs.cc``)::

    X, W, R, B, sequence_lens, initial_h, initial_c, P, W_scale, W_zero_point, R_scale, R_zero_point

with ``W`` and ``R`` stored as 8-bit integers in the *transposed* layout ``[num_directions, input_size,
4·hidden_size]`` and ``[num_directions, hidden_size, 4·hidden_size]`` (ONNX's LSTM stores ``[D, 4H, I]`` and
``[D, 4H, H]``; the gate order i, o, f, c is the same). Scales and zero points are ``[D]`` (per tensor) or
``[D, 4H]`` (per output column). B, P, the states and the outputs stay float; the kernel quantizes its float
operands to 8 bits at run time and multiplies them with the int8 weights in integer arithmetic.

Weights use the target's weight spec: int8 symmetric (zero point 0), narrow range, one scale per gate column
``s[d, j] = max_i |W[d, j, i]| / qmax`` (or per direction with ``per_channel=False``); with ``reduce_range`` (x86
without VNNI, whose u8·s8 kernels can saturate) ``qmax = 63``. Saturation is real here too: on this AVX2 machine
8-bit int8 weights gave an LSTM output SQNR of 11–20 dB against 40–42 dB with 7-bit ones. So, as the integer
lowering passes do (``guard_saturation``), codes wider than 64 are stored as uint8 ``w + 128`` with zero point 128,
which the kernel runs on its exact u8·u8 path. Attributes (direction, hidden_size, activations,
clip, input_forget, …) carry over; ``layout`` is not among them, the contrib schema lacks it.

Refused (logged at INFO; the LSTM stays FP32 as it is): W or R not a constant initializer (fed at run time, or a
graph input a caller can override: there is nothing to quantize ahead of time), and ``layout=1`` (batch-first:
DynamicQuantizeLSTM would read ``[batch, seq, features]`` as ``[seq, batch, features]``; the annotator does not
plan such an LSTM either, the pass does not rely on it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer
from qgraph.ir.naming import NameScope
from qgraph.ir.values import MICROSOFT_DOMAIN, constant_refusal
from qgraph.passes.infrastructure import Refusal, register
from qgraph.passes.quantize._dynamic_weights import DynamicWeightPass

#: Largest int8 weight code for which the AVX2 u8·s8 kernels cannot saturate (docs/runtime-facts.md).
SAFE_INT8_WEIGHT_MAGNITUDE = 64
_OPTIONAL_INPUTS = 8  # X, W, R, B, sequence_lens, initial_h, initial_c, P


def quantize_recurrent_weight(
    weight: np.ndarray, *, qmax: int, per_channel: bool, guard_saturation: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[D, 4H, K]`` float weights → (codes ``[D, K, 4H]``, float32 scales and zero points ``[D, 4H]`` or ``[D]``).

    Codes are int8 with zero point 0, or uint8 ``w + 128`` with zero point 128 when ``guard_saturation`` is set
    and a code exceeds SAFE_INT8_WEIGHT_MAGNITUDE."""
    transposed = np.ascontiguousarray(np.transpose(weight.astype(np.float32), (0, 2, 1)))
    if per_channel:
        largest = np.max(np.abs(transposed), axis=1)  # [D, 4H]
        expanded = largest[:, None, :]
    else:
        largest = np.max(np.abs(transposed), axis=(1, 2))  # [D]
        expanded = largest[:, None, None]
    scale = np.where(largest > 0, largest / qmax, 1.0).astype(np.float32)
    divisor = np.where(expanded > 0, expanded / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint(transposed / divisor), -qmax, qmax).astype(np.int8)
    if guard_saturation and int(np.abs(codes.astype(np.int16)).max(initial=0)) > SAFE_INT8_WEIGHT_MAGNITUDE:
        return (codes.astype(np.int16) + 128).astype(np.uint8), scale, np.full(scale.shape, 128, np.uint8)
    return codes, scale, np.zeros(scale.shape, np.int8)


def _refusal(node: ir.Node) -> Refusal | None:
    """Why ``node`` (an LSTM) cannot run as DynamicQuantizeLSTM (see the module docstring), ``None`` when it can."""
    for index, role in ((1, "the LSTM weight W"), (2, "the LSTM recurrence weight R")):
        reason = constant_refusal(node.inputs[index] if len(node.inputs) > index else None, role)
        if reason is not None:
            return Refusal(reason)
    layout = node.attributes.get("layout")
    if layout is not None and layout.as_int() != 0:
        return Refusal(f"layout={layout.as_int()} (batch first): DynamicQuantizeLSTM has no layout attribute")
    return None


@register
class QuantizeLSTMDynamic(DynamicWeightPass):
    """Replace planned LSTM nodes by com.microsoft DynamicQuantizeLSTM with int8 transposed weights."""

    summary = "run LSTMs as com.microsoft DynamicQuantizeLSTM with int8 weights (--quantize-recurrent dynamic)"

    op_types = ("LSTM",)
    replacement = "DynamicQuantizeLSTM"

    def plan(self, node: ir.Node) -> ir.Node | str:
        refusal = _refusal(node)
        return node if refusal is None else refusal.reason

    def replace_planned(self, graph: ir.Graph, planned: list[tuple[ir.Node, object]], names: NameScope) -> None:
        for node, _ in planned:
            self._replace(graph, node, names)

    def _replace(self, graph: ir.Graph, node: ir.Node, names: NameScope) -> None:
        weight, recurrence = node.inputs[1], node.inputs[2]
        quantized: list[ir.Value] = []
        for value in (weight, recurrence):
            codes, scale, zero_point = quantize_recurrent_weight(
                value.const_value.numpy(), qmax=self.qmax, per_channel=self.per_channel,
                guard_saturation=self.guard_saturation,
            )
            quantized += [
                new_initializer(graph, names, f"{value.name}_quantized", codes),
                new_initializer(graph, names, f"{value.name}_scale", scale),
                new_initializer(graph, names, f"{value.name}_zero_point", zero_point),
            ]
        inputs = list(node.inputs) + [None] * (_OPTIONAL_INPUTS - len(node.inputs))
        inputs[1], inputs[2] = quantized[0], quantized[3]
        inputs += [quantized[1], quantized[2], quantized[4], quantized[5]]
        attributes = [attribute for name, attribute in node.attributes.items() if name != "layout"]
        outputs = list(node.outputs)
        replacement = ir.Node(
            MICROSOFT_DOMAIN, "DynamicQuantizeLSTM", inputs, attributes, num_outputs=len(outputs), name=node.name
        )
        for old, new in zip(outputs, replacement.outputs):
            new.name, new.type, new.shape = old.name, old.type, old.shape
        graph.insert_before(node, replacement)
        for old, new in zip(outputs, replacement.outputs):
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        drop_unused_initializers([weight, recurrence])

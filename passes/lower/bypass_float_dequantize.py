"""BypassFloatDequantize: float readers of a quantized activation read the float tensor itself.

After lowering, a QuantizeLinear ``q = saturate(round(x / s) + z)`` of a float activation ``x`` may still feed a
DequantizeLinear ``x̂ = (q − z) · s`` whose readers are float nodes: the integer kernels read ``q``, and the rest of
the graph reads ``x̂``, the QDQ simulation's view of ``x``. In a transformer that is the residual branch: the
LayerNorm output ``h`` is quantized for the next projection (QAttention, MatMulIntegerToFloat) and the skip
connection adds ``ĥ`` back. The pass lets those readers read ``x``::

    x → Q → DQ → float readers        becomes        x → float readers
         └→ integer readers                           x → Q → integer readers

(the Q and DQ are removed when nothing else reads them). Each float reader's input moves by ``x − x̂``: at most half
a step ``s / 2`` where ``x`` lies in the quantization range, more where it was clipped, so the result is at least as
close to FP32 as before and no longer follows the QDQ simulation there. That is why it belongs to the ``fast``
transformer kernels (:data:`qgraph.targets.ort_cpu.FAST_TRANSFORMER_PASSES`), which already give up deploy parity,
and not to the exact lowering (``transformer_kernels="auto"``, the default, takes the fast ones after PTQ where they
hold against FP32).

Why: the DequantizeLinear is pure cost. On a BERT-base-shaped encoder with the fast kernels (batch 8, sequence
128, 2 threads, onnxruntime 1.19.2) the 24 residual DequantizeLinears took 3.7 of 173.5 ms of kernel time.

Matched: a default-domain DequantizeLinear whose input is produced by a QuantizeLinear. Refused (logged): a
QuantizeLinear of a constant (a weight's codes stay as the model quantized them), one whose input is not float32,
parameters of the pair that differ (the DQ is then a rescaling, not the pair's inverse), a DequantizeLinear output
that is a graph output or that a QuantizeLinear reads (a requantization: integer codes would move), and a reader
whose output only QuantizeLinears read: a DQ → op → Q island left by the lowering, which onnxruntime may fuse into an
integer kernel at session creation (reading float there would make it a float op).
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.passes.lower import _qdq_patterns as qdq

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Plan:
    quantize: ir.Node
    dequantize: ir.Node


@register
class BypassFloatDequantize(RewritePass):
    """Float readers of DequantizeLinear(QuantizeLinear(x)) read x; the pair goes when nothing else reads it."""

    phase = Phase.LOWER
    summary = "float readers of DequantizeLinear(QuantizeLinear(x)) read x itself (fast transformer kernels)"

    def match(self, node: ir.Node, context: RewriteContext) -> _Plan | None:
        if not qdq.is_op(node, qdq.DEQUANTIZE) or not node.inputs or node.inputs[0] is None:
            return None
        producer = node.inputs[0].producer()
        return _Plan(producer, node) if qdq.is_op(producer, qdq.QUANTIZE) else None

    def check(self, plan: _Plan, context: RewriteContext) -> _Plan | Refusal:
        source = plan.quantize.inputs[0] if plan.quantize.inputs else None
        if source is None or source.const_value is not None or source.is_initializer():
            return Refusal("the QuantizeLinear quantizes a constant")
        if source.dtype not in (ir.DataType.FLOAT, None):
            return Refusal("the quantized tensor is not float32")
        output = plan.dequantize.outputs[0]
        if output.is_graph_output():
            return Refusal("the DequantizeLinear output is a graph output")
        for reader, _ in output.uses():
            if qdq.is_op(reader, qdq.QUANTIZE):
                return Refusal("a QuantizeLinear reads the DequantizeLinear output (a requantization)")
            if any(qdq.output_is_quantized_only(value) for value in reader.outputs):
                return Refusal(f"{reader.op_type} {reader.name} reads it inside a Q/DQ island (onnxruntime may "
                               f"fuse the island into an integer kernel)")
        mismatch = qdq.pair_mismatch(plan.quantize, plan.dequantize)
        return plan if mismatch is None else Refusal(mismatch)

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        plan.dequantize.outputs[0].replace_all_uses_with(plan.quantize.inputs[0])
        qdq.remove_if_unused([plan.dequantize, plan.quantize])

"""LowerFastGelu: an exact GELU whose output is only quantized becomes ``com.microsoft::FastGelu`` (its tanh form).

The exact GELU and the tanh approximation that FastGelu computes are::

    gelu(x)      = 0.5 · x · (1 + erf(x / √2))
    gelu_tanh(x) = 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))

Their largest difference over the reals is E₀ = 4.7324e-4, at |x| ≈ 2.70 (evaluated in float64 on a grid of step
1.2e-5 over [−12, 12]; beyond it both are x or 0 to below 1e-20). onnxruntime's float32 kernels add their own
rounding (at most 5e-7 against the formulas, measured by FuseGelu), so ``|gelu(x) − FastGelu(x)| ≤ E = 4.8e-4``.

When every reader of the GELU output ``y`` is a QuantizeLinear ``q = saturate(round(y / s) + z)`` with a constant
per-tensor scale, replacing ``y`` by ``y'`` with ``|y − y'| ≤ E`` moves ``y / s`` by at most ``E / s``. The pass
accepts only ``s ≥ 4·E`` (:data:`MINIMUM_OUTPUT_SCALE`): a quarter of a step at most, so a code moves by at most one
step, and only where ``y / s`` lies within ``E / s`` of a rounding boundary — within what lowering may change
(one quantization step). A transformer's FFN activation, quantized to uint8 over roughly [−0.17, 10], has
``s ≈ 0.04``: about 1% of the range of a step, and 0.3% of the codes moved by one on BERT-base-shaped inputs.

Why: onnxruntime 1.19.2's CPU FastGelu runs the tanh form about twice as fast as its Gelu runs erf (the GELU of a
BERT-base FFN, ``[1, 128, 3072]``, 2 threads: 0.21 against 0.39 ms of CPU time; docs/runtime-facts.md).

Matched: ``com.microsoft::Gelu`` and the default domain's ``Gelu`` (opset ≥ 20) with ``approximate="none"``, on a
float32 input. Refused (logged): an output that is a graph output or that something other than a QuantizeLinear
reads, a QuantizeLinear whose scale is not a constant per-tensor float32 or is below :data:`MINIMUM_OUTPUT_SCALE`
(the approximation would be a visible fraction of a step).
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.passes.lower import _qdq_patterns as qdq

logger = logging.getLogger(__name__)

#: The bound E of ``|gelu(x) − FastGelu(x)|`` (see the module docstring).
APPROXIMATION_ERROR = 4.8e-4
#: The smallest output scale for which the approximation moves ``y / s`` by at most a quarter step.
MINIMUM_OUTPUT_SCALE = 4 * APPROXIMATION_ERROR


@dataclasses.dataclass(frozen=True)
class _Plan:
    gelu: ir.Node


def _is_exact_gelu(node: ir.Node) -> bool:
    if node.op_type != "Gelu":
        return False
    if node.domain == qdq.MICROSOFT_DOMAIN:
        return True
    if node.domain not in ("", "ai.onnx"):
        return False
    return qdq.attribute(node, "approximate", "none") == "none"


def _output_refusal(output: ir.Value) -> str | None:
    """Why the GELU output ``output`` may not move by the approximation, or None."""
    if output.is_graph_output():
        return "the GELU output is a graph output (read as float)"
    readers = [user for user, _ in output.uses()]
    if not readers:
        return "nothing reads the GELU output"
    for reader in readers:
        if not qdq.is_op(reader, qdq.QUANTIZE):
            return f"the GELU output is read as float by {reader.op_type} {reader.name}"
        params = qdq.read_params(reader)
        if isinstance(params, str):
            return params
        if not params.per_tensor:
            return f"{reader.name} quantizes the GELU output per channel"
        if params.scalar_scale() < MINIMUM_OUTPUT_SCALE:
            return (f"{reader.name} quantizes the GELU output with scale {params.scalar_scale():.3g} < "
                    f"{MINIMUM_OUTPUT_SCALE:.3g}: the tanh approximation would be more than a quarter step")
    return None


@register
class LowerFastGelu(RewritePass):
    """Replace an exact GELU read only by coarse-enough QuantizeLinears with com.microsoft FastGelu."""

    phase = Phase.LOWER
    summary = "Gelu (erf) read only by QuantizeLinear (scale >= 4x its error) becomes com.microsoft FastGelu (tanh)"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        return node if _is_exact_gelu(node) else None

    def check(self, gelu: ir.Node, context: RewriteContext) -> _Plan | Refusal:
        source = gelu.inputs[0] if gelu.inputs else None
        if source is None or source.dtype not in (ir.DataType.FLOAT, None):
            return Refusal("the GELU input is not float32")
        reason = _output_refusal(gelu.outputs[0])
        return Refusal(reason) if reason else _Plan(gelu)

    def rewrite(self, plan: _Plan, context: RewriteContext) -> None:
        gelu = plan.gelu
        fast = ir.Node(qdq.MICROSOFT_DOMAIN, "FastGelu", [gelu.inputs[0]], name=qdq.derived_name(gelu, "fast"))
        gelu.graph.insert_before(gelu, fast)
        qdq.take_over(gelu.outputs[0], fast.outputs[0])
        qdq.ensure_microsoft_domain(context.model)
        qdq.remove_if_unused([gelu])

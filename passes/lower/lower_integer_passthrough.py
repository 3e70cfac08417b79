"""LowerIntegerPassThrough: ``DQ(x) → MaxPool | Reshape | Transpose | Flatten | Squeeze | Unsqueeze | Slice | Gather
| Split | Resize(nearest) → Q(y)`` with identical (scale, zero point, integer type) on x and y runs the op on the
integer tensor directly (Split: every output read by one such Q, or by nothing).

These ops only move, select or take the maximum of elements (Gather selects along an axis by its integer indices,
Resize in ``mode="nearest"`` copies the nearest input element). Dequantization ``d(q) = (q - z)·s`` with ``s > 0`` is
strictly increasing, so for any such op ``f`` (data movement, or a max over a window) ``f(d(q)) = d(f(q))``, and
with the same parameters on both sides ``Q(d(v)) = v`` for every integer ``v`` in range, hence

    Q(f(DQ(xq))) = Q(DQ(f(xq))) = f(xq)        exactly.

MaxPool pads with the type's lowest value, which never wins a window that contains a real element, as ``-inf``
never does in float.

Speed: onnxruntime 1.19.2's NCHW MaxPool for uint8 is a slow generic loop — measured 935 µs against 177 µs for
float on a 1×64×56×56 tensor (one thread) — while ``Transpose → com.microsoft NhwcMaxPool → Transpose`` on uint8
takes 60 µs and gives identical results. So a 2-D MaxPool becomes that sequence (``channels_last_max_pool=True``,
the default); other ranks, or ``channels_last_max_pool=False``, keep an NCHW integer MaxPool. Type constraints checked
against the model's default opset: MaxPool takes int8/uint8 from opset 12, Flatten all types from opset 9,
Reshape/Transpose/Squeeze/Unsqueeze/Slice/Gather/Split all types in every opset, Resize from opset 11 (onnxruntime
1.19.2's CPU Resize is registered for int8 and uint8, and its nearest mode copies elements whatever the type; linear and
cubic interpolate, which in integers rounds differently from ``Q(linear(DQ(x)))``, so only ``nearest`` is lowered, and
only without ``antialias``).

Speed of the selection ops (onnxruntime 1.19.2, AMD EPYC Zen 4 shared by 2 cores, one thread, graph optimisation
on, 1×64×56×56 uint8 island with the outer Q/DQ, median of 2×5 rounds): Slice 112 → 78 µs (1.45×), Gather 44 → 44
µs, Split 59 → 59 µs (onnxruntime already drops the DQ/Q pair around them when it optimises), Resize nearest ×2
1660 → 1628 µs; none is slower, and a session without graph optimisation gains the DQ and Q it no longer runs.

Refused (logged): different parameters on x and y (a requantization, not an identity), per-channel params,
non-constant params, an opset whose op does not take the integer type, a used MaxPool ``Indices`` output, another
input of the op produced by a DQ, the float result read by anything but the one Q.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register
from qgraph.passes.lower import _qdq_patterns as qdq

logger = logging.getLogger(__name__)

#: Op → first default-domain opset in which it accepts uint8/int8 tensors.
MINIMUM_OPSET = {
    "MaxPool": 12, "Reshape": 1, "Transpose": 1, "Flatten": 9, "Squeeze": 1, "Unsqueeze": 1, "Slice": 1, "Gather": 1,
    "Split": 1, "Resize": 11,
}


@dataclasses.dataclass(frozen=True)
class _PassThroughPlan:
    """An accepted op: the quantization its input and output share, and the Q that reads its output."""

    node: ir.Node
    params: qdq.QuantParams
    output: qdq.OutputQuantize | None
    #: Split: the Q of each output (None for an output nobody reads).
    split_outputs: tuple[qdq.OutputQuantize | None, ...] = ()


@register
class LowerIntegerPassThrough(RewritePass):
    """Run data-movement ops and MaxPool on the integer tensor when input and output share their quantization."""

    phase = Phase.LOWER
    summary = ("DQ → MaxPool|Reshape|Transpose|Flatten|Squeeze|Unsqueeze|Slice|Gather|Split|Resize(nearest) → Q "
               "(same params) runs on the integers")

    def __init__(self, *, channels_last_max_pool: bool = True) -> None:
        super().__init__()
        self.channels_last_max_pool = channels_last_max_pool

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not qdq.is_op(node, *MINIMUM_OPSET) or not node.inputs or qdq.dequantize_of(node.inputs[0]) is None:
            return None
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> _PassThroughPlan | Refusal:
        opset = qdq.default_opset(context.model)
        if opset < MINIMUM_OPSET[node.op_type]:
            return Refusal(
                f"{node.op_type} takes integer tensors from opset {MINIMUM_OPSET[node.op_type]}, model has {opset}"
            )
        if any(qdq.dequantize_of(value) is not None for value in node.inputs[1:]):
            return Refusal("another input of the op is dequantized")
        if node.op_type == "Resize":
            mode = qdq.attribute(node, "mode", "nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode != "nearest" or qdq.attribute(node, "antialias", 0):
                return Refusal(f"Resize in mode {mode!r} interpolates (only nearest copies elements exactly)")
        params = qdq.read_params(qdq.dequantize_of(node.inputs[0]))
        if isinstance(params, str):
            return Refusal(params)
        if not params.per_tensor:
            return Refusal("the input is quantized per channel")
        if node.op_type == "Split":
            return self._check_split(node, params)
        if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
            return Refusal("a secondary output (MaxPool Indices) is used")
        output = qdq.output_quantize(node.outputs[0], allow_activation=False, dtype=params.integer_type)
        if output is None or isinstance(output, str):
            return Refusal(output or f"the {node.op_type} output is read as float (not only by one Q)")
        if not params.same_as(output.params):
            return Refusal("input and output quantization differ (that is a requantization, not a pass-through)")
        return _PassThroughPlan(node, params, output)

    @staticmethod
    def _check_split(node: ir.Node, params: qdq.QuantParams) -> _PassThroughPlan | Refusal:
        quantizes = []
        for value in node.outputs:
            if not value.uses() and not value.is_graph_output():
                quantizes.append(None)
                continue
            output = qdq.output_quantize(value, allow_activation=False, dtype=params.integer_type)
            if output is None or isinstance(output, str):
                return Refusal(output or f"Split output {value.name!r} is read as float (not only by one Q)")
            if not params.same_as(output.params):
                return Refusal(f"Split output {value.name!r} is quantized with other parameters (a requantization)")
            quantizes.append(output)
        if all(output is None for output in quantizes):
            return Refusal("no Split output is read")
        return _PassThroughPlan(node, params, None, tuple(quantizes))

    def rewrite(self, plan: _PassThroughPlan, context: RewriteContext) -> None:
        node, params, output = plan.node, plan.params, plan.output
        if node.op_type == "Split":
            self._rewrite_split(plan, context)
            return
        if node.op_type == "MaxPool" and self.channels_last_max_pool and len(qdq.attribute(node, "kernel_shape")) == 2:
            self._rewrite_channels_last(node, params, output, context.model)
            return
        lowered = ir.Node(
            node.domain, node.op_type, [params.integer_value, *node.inputs[1:]], qdq.copy_attributes(node),
            name=qdq.derived_name(node, "integer"),
        )
        lowered.outputs[0].type = ir.TensorType(params.integer_type)
        qdq.replace_island(context.model, node, output, lowered)

    @staticmethod
    def _rewrite_split(plan: _PassThroughPlan, context: RewriteContext) -> None:
        """One Split on the integers; each Q's readers move to the matching integer output."""
        node, params = plan.node, plan.params
        lowered = ir.Node(
            node.domain, node.op_type, [params.integer_value, *node.inputs[1:]], qdq.copy_attributes(node),
            num_outputs=len(node.outputs), name=qdq.derived_name(node, "integer"),
        )
        for value in lowered.outputs:
            value.type = ir.TensorType(params.integer_type)
        node.graph.insert_before(node, [lowered])
        for output, value in zip(plan.split_outputs, lowered.outputs):
            if output is not None:
                qdq.take_over(output.quantize.outputs[0], value)
            else:
                value.name = context.names.fresh(f"{node.name or 'split'}_unused")
        qdq.remove_if_unused([output.quantize for output in plan.split_outputs if output is not None])
        qdq.remove_if_unused([node, qdq.dequantize_of(node.inputs[0])])
        logger.debug("lowered %s to %s", qdq.describe_node(node), qdq.describe_node(lowered))

    @staticmethod
    def _rewrite_channels_last(
        node: ir.Node, params: qdq.QuantParams, output: qdq.OutputQuantize, model: ir.Model
    ) -> None:
        """NCHW → NHWC, com.microsoft NhwcMaxPool on the integers, NHWC → NCHW (same max over the same windows)."""
        graph, base = node.graph, node.name or "maxpool"
        to_channels_last = ir.Node(
            "", "Transpose", [params.integer_value], [ir.AttrInt64s("perm", [0, 2, 3, 1])], name=f"{base}_to_nhwc"
        )
        pool = ir.Node(
            qdq.MICROSOFT_DOMAIN, "NhwcMaxPool", [to_channels_last.outputs[0]],
            qdq.copy_attributes(node, drop=("storage_order",)), name=f"{base}_nhwc",
        )
        lowered = ir.Node(
            "", "Transpose", [pool.outputs[0]], [ir.AttrInt64s("perm", [0, 3, 1, 2])], name=f"{base}_to_nchw"
        )
        for value in (to_channels_last.outputs[0], pool.outputs[0], lowered.outputs[0]):
            value.type = ir.TensorType(params.integer_type)
        graph.insert_before(output.quantize, [to_channels_last, pool])
        qdq.replace_island(model, node, output, lowered, contrib=True)

"""The base classes of the LOWER passes: what every integer-weight lowering and every com.microsoft island shares.

:class:`QuantizedOperandsLowering` matches an op whose first two inputs are dequantized (Conv, MatMul, Gemm), the
integer-kernel-plus-rescale lowerings only where the float output is read as float. :class:`WeightLowering` adds
the one option of the lowerings that feed a stored weight to a u8·s8 kernel: ``guard_saturation`` (see
:mod:`qgraph.passes.lower._qdq_patterns`: on CPUs without VNNI a weight wider than 7 bits is stored as uint8 so the
kernel cannot saturate).

:class:`ContribIslandLowering` is the shape shared by the passes that turn a QDQ island into one com.microsoft
``QLinear*`` kernel.

An island ``DQ(x₁), …, DQ(xₙ) → op → Q(y)`` becomes one kernel that reads every input as the triple
``(xq, sx, zx)`` of its integer tensor, scale and zero point, and writes ``yq`` with the output's ``(sy, zy)``:

    yq = saturate(round(op((x₁q - z₁)·s₁, …, (xₙq - zₙ)·sₙ) / sy) + zy)

which is ``Q(op(DQ(x₁), …, DQ(xₙ)))`` up to where the float rounding happens (at most one output step). Each input
must be a uint8 per-tensor activation with constant parameters, and the op's float result must be read by the one Q
only (see :func:`~qgraph.passes.lower._qdq_patterns.output_quantize`). What differs between the kernels — which ops
they take, which inputs are quantized, the order of the triples, the attributes, extra refusals — is what a
subclass of :class:`ContribIslandLowering` says; matching, checking and the replacement are written here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir

from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass
from qgraph.passes.lower import _qdq_patterns as qdq


@dataclasses.dataclass(frozen=True)
class IslandPlan:
    """An accepted island: the op, the quantization of each of its quantized inputs in order, and the Q of its
    output."""

    node: ir.Node
    inputs: tuple[qdq.QuantParams, ...]
    output: qdq.OutputQuantize


@dataclasses.dataclass(frozen=True)
class MatMulPlan:
    """An accepted quantized MatMul: its activation (left) and right operand, and the Q of its output when the
    output is quantized (None when it stays float)."""

    matmul: ir.Node
    left: qdq.QuantParams
    right: qdq.MatMulOperand
    output: qdq.OutputQuantize | None = None


class QuantizedOperandsLowering(RewritePass):
    """A LOWER pass for an :attr:`op_type` node whose first two inputs (activation, weight or second operand) are
    both dequantized; with :attr:`float_output_only`, only where the float output is read as float (an integer
    kernel plus a float rescale), the case the QLinear lowering of the same op leaves."""

    phase = Phase.LOWER
    op_type = ""
    float_output_only = False

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not qdq.is_op(node, self.op_type) or not qdq.inputs_dequantized(node, 2):
            return None
        if self.float_output_only and qdq.output_is_quantized_only(node.outputs[0]):
            return None  # the QLinear lowering's pattern
        return node


class WeightLowering(QuantizedOperandsLowering):
    """A LOWER pass that hands a stored weight to an integer kernel, guarding the u8·s8 kernels against saturation."""

    def __init__(self, *, guard_saturation: bool = True) -> None:
        super().__init__()
        self.guard_saturation = guard_saturation


class ContribIslandLowering(RewritePass):
    """Lower ``DQ… → op → Q`` islands of the ops in :attr:`kernels` to the com.microsoft kernel named there."""

    phase = Phase.LOWER
    #: Op type → the com.microsoft kernel that replaces it.
    kernels: dict[str, str] = {}
    #: Whether a Relu/Clip between the op and its Q may be dropped when the output range implies it.
    allow_activation = False

    def quantized_inputs(self, node: ir.Node) -> Sequence[ir.Value | None]:
        """The inputs of ``node`` the kernel reads as integer triples (the first one, unless a kernel says more)."""
        return node.inputs[:1]

    def refusal(self, node: ir.Node) -> str | None:
        """Why this kernel cannot compute ``node`` whatever its quantization (an attribute it lacks), or ``None``."""
        return None

    def kernel_inputs(self, plan: IslandPlan, triples: list[list[ir.Value]], output: list[ir.Value]) -> list[ir.Value]:
        """The kernel's inputs from each quantized input's triple and the output's ``[scale, zero point]``."""
        return [value for triple in triples for value in triple] + output

    def kernel_attributes(self, node: ir.Node) -> list[ir.Attr]:
        """The kernel's attributes, read from the float op's."""
        return []

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        if not qdq.is_op(node, *self.kernels):
            return None
        quantized = self.quantized_inputs(node)
        if not quantized or any(qdq.dequantize_of(value) is None for value in quantized):
            return None
        return node

    def check(self, node: ir.Node, context: RewriteContext) -> IslandPlan | Refusal:
        reason = self.refusal(node)
        if reason is not None:
            return Refusal(reason)
        inputs = []
        for value in self.quantized_inputs(node):
            params = qdq.activation_input(value)
            if isinstance(params, str):
                return Refusal(params)
            inputs.append(params)
        output = qdq.output_quantize(node.outputs[0], allow_activation=self.allow_activation)
        if output is None or isinstance(output, str):
            return Refusal(output or f"the {node.op_type} output is read as float (not only by one Q)")
        return IslandPlan(node, tuple(inputs), output)

    def rewrite(self, plan: IslandPlan, context: RewriteContext) -> None:
        node, output = plan.node, plan.output
        graph, anchor = node.graph, output.quantize
        triples = [qdq.quantized_triple(graph, context.names, params, before=anchor) for params in plan.inputs]
        output_pair = qdq.scale_and_zero_point(graph, context.names, output.params, before=anchor)
        lowered = ir.Node(
            qdq.MICROSOFT_DOMAIN, self.kernels[node.op_type], self.kernel_inputs(plan, triples, output_pair),
            self.kernel_attributes(node), name=qdq.derived_name(node, "quant"),
        )
        qdq.replace_island(context.model, node, output, lowered, contrib=True)

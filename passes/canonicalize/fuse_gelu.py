"""FuseGelu: fuse a GELU that an exporter wrote out node by node into one Gelu (or FastGelu) node.

The exact GELU and its tanh approximation are::

    gelu(x)      = x · Φ(x) = x · 0.5 · (1 + erf(x / √2))
    gelu_tanh(x) = 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))

Recognised spellings (any order of the operands of Add and Mul, constants within a relative 1e-4 of the values
above, since exporters print them with 7–10 significant digits):

- Erf form: ``Div(x, 1.4142135)`` or ``Mul(x, 0.70710678)`` → ``Erf`` → ``Add(·, 1)``, then the product of x, 0.5
  and that sum in any association: ``Mul(Mul(x, p), 0.5)`` (torch.onnx), ``Mul(Mul(x, 0.5), p)``,
  ``Mul(Mul(p, 0.5), x)``;
- tanh form: x³ as ``Pow(x, 3)`` (Hugging Face's NewGELU) or ``Mul(x, Mul(x, x))`` (torch.onnx), then
  ``Mul(·, 0.044715)`` → ``Add(x, ·)`` → ``Mul(·, 0.7978845608)`` → ``Tanh`` → ``Add(·, 1)`` and the same three-factor
  product.

Which node replaces them depends on the model's default-domain opset:

- opset ≥ 20: the standard ``Gelu`` (``approximate="none"`` or ``"tanh"``), which onnxruntime 1.19 runs (measured);
- opset < 20: ``com.microsoft::Gelu`` (exact, erf) or ``com.microsoft::FastGelu`` (tanh approximation with the same
  constants), which onnxruntime runs at any opset; the com.microsoft domain import is added when missing.

The fused kernels evaluate the same formula in float32 with their own erf/tanh approximations, so the output matches
the decomposed graph to float32 rounding, not bit for bit (measured on onnxruntime 1.19.2 for |x| up to 12: at most
6e-8 absolute for the Erf form, 5e-7 for the tanh form).

Refused (the graph is left as it is, the reason logged): a constant outside the tolerance (a near-GELU such as
``0.5 · x · (1 + erf(x / 1.5))`` is another function), an intermediate value that another node reads or that is a
graph output (fan-out), a constant with more than one element or whose rank would broadcast the output, an element
type other than float32, and a GELU in a function body (constants there are not initializers).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import onnx_ir as ir

from qgraph.passes._rewrite_support import constant_array, known_rank_and_dtype
from qgraph.passes.canonicalize._pattern_matching import (
    MICROSOFT_DOMAIN,
    AnalysedFusion,
    FusedChain,
    FusionRefused,
    close_to,
    default_opset,
    ensure_microsoft_domain,
    is_op,
    other_operand,
    private_value_refusal,
    producer_if,
    replace_chain,
    scalar_constant,
    sole_consumer,
    sole_consumer_refusal,
    split_constant_operand,
)
from qgraph.passes.infrastructure import RewriteContext, register

logger = logging.getLogger(__name__)

#: Relative tolerance on the pattern's constants.
CONSTANT_TOLERANCE = 1e-4
SQRT_TWO = math.sqrt(2.0)
TANH_SCALE = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
#: The first default-domain opset with Gelu.
STANDARD_GELU_OPSET = 20


@dataclasses.dataclass(frozen=True)
class GeluPlan(FusedChain):
    """A recognised GELU: its input x, its output, the nodes computing it, its Erf or Tanh node and which form."""

    anchor: ir.Node
    approximate: bool


@register
class FuseGelu(AnalysedFusion):
    """Fuse a decomposed GELU (Erf or tanh form) into Gelu / com.microsoft Gelu or FastGelu."""

    summary = "Fuse decomposed GELU (Erf and tanh forms) into Gelu (opset >= 20) or com.microsoft Gelu/FastGelu"
    fused = "GELU"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        """The Erf or Tanh node at the heart of a GELU."""
        if (is_op(node, "Erf") or is_op(node, "Tanh")) and node.inputs and node.inputs[0] is not None:
            producer = node.inputs[0].producer()
            if producer is not None and producer.op_type in ("Div", "Mul"):
                return node
        return None

    def analyse(self, match: ir.Node, context: RewriteContext) -> GeluPlan:
        if match.op_type == "Erf":
            return self._analyse_erf(match)
        return self._analyse_tanh(match)

    def rewrite(self, plan: GeluPlan, context: RewriteContext) -> None:
        graph = plan.anchor.graph
        base = plan.output.name or "gelu"
        name = context.names.fresh(f"{base}_gelu")
        if default_opset(context.model) >= STANDARD_GELU_OPSET:
            approximate = "tanh" if plan.approximate else "none"
            fused = ir.Node("", "Gelu", [plan.data], attributes=[ir.AttrString("approximate", approximate)], name=name)
        else:
            ensure_microsoft_domain(context.model)
            op_type = "FastGelu" if plan.approximate else "Gelu"
            fused = ir.Node(MICROSOFT_DOMAIN, op_type, [plan.data], name=name)
        replace_chain(graph, plan.nodes, plan.output, fused)
        logger.debug("fused %d nodes into %s::%s %s", len(plan.nodes), fused.domain or "ai.onnx", fused.op_type, name)

    # -- analysis ------------------------------------------------------------------------------------------------
    def _analyse_erf(self, erf: ir.Node) -> GeluPlan:
        scaled = erf.inputs[0]
        producer = scaled.producer()
        if is_op(producer, "Div") and len(producer.inputs) == 2:
            data = producer.inputs[0]
            self._expect_constant(producer.inputs[1], SQRT_TWO, "the divisor of x before Erf")
        elif is_op(producer, "Mul"):
            split = split_constant_operand(producer)
            if split is None:
                raise FusionRefused("the Mul before Erf has no constant operand")
            data = split[0]
            self._expect_constant(split[1], 1.0 / SQRT_TWO, "the factor of x before Erf")
        else:
            raise FusionRefused(f"Erf reads {producer.op_type}, not x / √2")
        nodes = [producer, erf]
        self._private(scaled, erf, "Erf input")
        return self._finish(erf, data, nodes, approximate=False)

    def _analyse_tanh(self, tanh: ir.Node) -> GeluPlan:
        argument = tanh.inputs[0]
        scale_mul = producer_if(argument, "Mul")
        split = split_constant_operand(scale_mul) if scale_mul is not None else None
        if split is None:
            raise FusionRefused("Tanh does not read a product with a constant")
        inner = split[0]
        self._expect_constant(split[1], TANH_SCALE, "the factor √(2/π) before Tanh")
        self._private(argument, tanh, "Tanh input")
        add = producer_if(inner, "Add")
        if add is None or len(add.inputs) != 2:
            raise FusionRefused("the Tanh argument is not √(2/π) · (x + 0.044715 · x³)")
        self._private(inner, scale_mul, "x + 0.044715 · x³")
        for data, weighted in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            cubic_mul = producer_if(weighted, "Mul")
            cubic_split = split_constant_operand(cubic_mul) if cubic_mul is not None else None
            if cubic_split is None:
                continue
            cube_nodes = _cube_of(cubic_split[0], data)
            if cube_nodes is None:
                continue
            self._expect_constant(cubic_split[1], TANH_CUBIC, "the factor of x³")
            self._private(weighted, add, "0.044715 · x³")
            self._private(cubic_split[0], cubic_mul, "x³")
            if len(cube_nodes) == 2:
                self._private(cube_nodes[0].outputs[0], cube_nodes[1], "x²")
            if cube_nodes[-1].op_type == "Pow":
                self._expect_constant(cube_nodes[-1].inputs[1], 3.0, "the exponent of x³")
            nodes = [*cube_nodes, cubic_mul, add, scale_mul, tanh]
            return self._finish(tanh, data, nodes, approximate=True)
        raise FusionRefused("the Add before Tanh is not x + 0.044715 · x³ (with x³ as Pow(x, 3) or x · x · x)")

    def _finish(self, function: ir.Node, data: ir.Value, nodes: list[ir.Node], *, approximate: bool) -> GeluPlan:
        """Match ``Add(f, 1)`` after the Erf/Tanh node and the product of x, 0.5 and that sum."""
        rank, dtype = known_rank_and_dtype(data)
        if dtype is not None and dtype != ir.DataType.FLOAT:
            raise FusionRefused(f"element type {dtype.name}: only float32 GELUs are fused")
        value = function.outputs[0]
        add = sole_consumer(value)
        if add is None:
            raise FusionRefused(sole_consumer_refusal(value, f"the {function.op_type} output"))
        split = split_constant_operand(add) if is_op(add, "Add") else None
        if split is None or split[0] is not value:
            raise FusionRefused(f"the {function.op_type} output does not go (alone) into Add(·, 1)")
        self._expect_constant(split[1], 1.0, f"the constant added to {function.op_type}")
        total = add.outputs[0]
        nodes = [*nodes, add]
        first = sole_consumer(total)
        if first is None:
            raise FusionRefused(sole_consumer_refusal(total, f"the 1 + {function.op_type}(…)"))
        if not is_op(first, "Mul"):
            raise FusionRefused(f"1 + {function.op_type}(…) does not go (alone) into Mul")
        factor = other_operand(first, total)
        if factor is data:
            second = sole_consumer(first.outputs[0])
            second_split = split_constant_operand(second) if is_op(second, "Mul") else None
            if second_split is None or second_split[0] is not first.outputs[0]:
                raise FusionRefused("x · (1 + …) is not multiplied (alone) by 0.5")
            self._expect_constant(second_split[1], 0.5, "the factor 0.5")
            nodes += [first, second]
        elif constant_array(factor) is not None:
            self._expect_constant(factor, 0.5, "the factor 0.5")
            second = sole_consumer(first.outputs[0])
            if not is_op(second, "Mul") or other_operand(second, first.outputs[0]) is not data:
                raise FusionRefused("0.5 · (1 + …) is not multiplied (alone) by x")
            nodes += [first, second]
        else:
            half = producer_if(factor, "Mul")
            half_split = split_constant_operand(half) if half is not None else None
            if half_split is None or half_split[0] is not data:
                raise FusionRefused("1 + … is multiplied by something other than x, 0.5 or 0.5 · x")
            self._expect_constant(half_split[1], 0.5, "the factor 0.5")
            self._private(factor, first, "0.5 · x")
            nodes += [half, first]
            second = first
        for node in nodes[:-1]:
            for output in node.outputs:
                readers = [use.node for use in output.uses() if any(use.node is member for member in nodes)]
                refusal = private_value_refusal(output, readers, f"{node.op_type} output")
                if refusal:
                    raise FusionRefused(refusal)
        for node in nodes:
            for value in node.inputs:
                if constant_array(value) is not None:
                    self._check_broadcast(value, rank)
        return GeluPlan(data, second.outputs[0], tuple(nodes), function, approximate)

    def _expect_constant(self, value: ir.Value | None, expected: float, role: str) -> None:
        actual = scalar_constant(value)
        if actual is None:
            raise FusionRefused(f"{role} is not a one-element constant")
        array = constant_array(value)
        if str(array.dtype) != "float32":
            raise FusionRefused(f"{role} has element type {array.dtype}, not float32")
        if not close_to(actual, expected, CONSTANT_TOLERANCE):
            raise FusionRefused(f"{role} is {actual!r}, not {expected:.8g} (relative tolerance {CONSTANT_TOLERANCE})")

    def _check_broadcast(self, value: ir.Value, rank: int | None) -> None:
        """Refuse a constant that could change the output's shape when added to or multiplied with a rank-``rank`` x."""
        array = constant_array(value)
        if array.size != 1:
            raise FusionRefused(f"the constant {value.name!r} has {array.size} elements")
        if (rank is None and array.ndim > 0) or (rank is not None and array.ndim > rank):
            raise FusionRefused(f"the constant {value.name!r} of rank {array.ndim} could broadcast the output")

    @staticmethod
    def _private(value: ir.Value, reader: ir.Node, role: str) -> None:
        refusal = private_value_refusal(value, [reader], role)
        if refusal:
            raise FusionRefused(refusal)


def _cube_of(value: ir.Value, data: ir.Value) -> list[ir.Node] | None:
    """The nodes computing ``value = data³`` (``Pow(data, 3)``, or ``Mul(data, Mul(data, data))`` in any order)."""
    pow_node = producer_if(value, "Pow")
    if pow_node is not None and len(pow_node.inputs) == 2 and pow_node.inputs[0] is data:
        return [pow_node]
    outer = producer_if(value, "Mul")
    if outer is None or len(outer.inputs) != 2:
        return None
    square = other_operand(outer, data)
    inner = producer_if(square, "Mul") if square is not None else None
    if inner is None or inner.inputs[0] is not data or inner.inputs[1] is not data:
        return None
    return [inner, outer]

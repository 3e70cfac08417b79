"""FuseLayerNormalization: fuse a LayerNorm that an exporter wrote out node by node into one LayerNormalization.

LayerNormalization (opset 17) over the trailing axes ``A = (r-k, …, r-1)`` of an input x of rank r is::

    μ   = mean_A(x)                       ReduceMean(x, axes=A, keepdims=1)
    d   = x - μ                           Sub
    σ²  = mean_A(d²)                      Pow(d, 2) or Mul(d, d), then ReduceMean(axes=A, keepdims=1)
    n   = d / sqrt(σ² + ε)                Add(σ², ε) → Sqrt → Div(d, ·)   or   … → Sqrt → Reciprocal → Mul(d, ·)
    y   = n · γ + β                       Mul(n, γ) → Add(·, β)   (optional: γ = 1, β = 0 are synthesised)

which is ``LayerNormalization(x, γ, β, axis=-k, epsilon=ε)``. The spellings recognised, all of them the same math:

- torch.onnx: ReduceMean → Sub → Pow(2) → ReduceMean → Add(ε) → Sqrt → Div → Mul(γ) → Add(β);
- hand-written or older exporters: ``Mul(d, d)`` instead of ``Pow(d, 2)``;
- tf2onnx: two separate ``Sub(x, μ)`` nodes (one squared, one normalised) reading the same μ, and ``rsqrt`` written
  as ``Reciprocal(Sqrt(·))`` followed by ``Mul``;
- with or without γ and β, operands of ``Add``/``Mul`` in either order;
- ReduceMean axes as an attribute (opset < 18) or as a constant input (opset ≥ 18); any number k of trailing axes;
- ε = 0 (no ``Add`` before the Sqrt).

What is refused, with the reason logged:

- ε added *after* the square root, ``d / (sqrt(σ²) + ε)``. That is not LayerNormalization:
  ``1/(s + ε) - 1/sqrt(s² + ε) ≈ -ε/s² + ε/(2s³)`` is not zero, and for a row of (nearly) constant values (s → 0)
  the two give ``d/ε`` against ``d/sqrt(ε)`` — a factor ``1/sqrt(ε)`` (≈ 300 for ε = 1e-5) apart. No choice of the
  fused ε makes them equal for every input, so the graph is left as it is rather than approximated;
- the mean of the ``Sub`` not being the very ReduceMean output that is squared, axes that are not the trailing
  axes or differ between the two ReduceMeans, ``keepdims=0``, a non-constant ε (a γ or β that is not a constant is
  simply left outside the fused node: ``Mul(LayerNormalization(x), γ)`` is still exact);
- an intermediate value that another node reads or that is a graph output (fan-out);
- γ, β or ε whose shape would broadcast over the non-normalised axes, a normalised shape that neither x nor γ/β
  determine statically (LayerNormalization's Scale needs it), an element type other than float32;
- a model whose default-domain opset is below 17. LayerNormalization does not exist there, and onnxruntime 1.19.2
  has no ``com.microsoft::LayerNormalization`` (measured: "not a registered function/op"; its contrib kernel is
  registered in the default domain for opsets 1–16, which onnx.checker rejects). The refusal is an OpsetRefusal:
  UpgradeOpsetForFusions, before this pass in the canonical pipeline, converts such a model to opset 17 (checked
  numerically) when it finds one.

The fused node computes in float32 with its own reduction (onnxruntime: one pass over E[x] and E[x²]), so its output
matches the decomposed graph to float32 rounding (~1e-6 relative), not bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.passes._rewrite_support import (
    constant_array,
    drop_unused_initializers,
    known_rank_and_dtype,
    new_initializer,
)
from qgraph.passes.canonicalize._normalization_matching import (
    Refused,
    broadcast_parameter,
    normalized_axes_shape,
)
from qgraph.passes.canonicalize._pattern_matching import (
    OpsetRefusal,
    default_opset,
    is_op,
    private_value_refusal,
    scalar_constant,
    sole_consumer,
    sole_consumer_refusal,
    split_constant_operand,
)
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass, register

logger = logging.getLogger(__name__)

#: The first default-domain opset with LayerNormalization.
MINIMUM_OPSET = 17
#: The first default-domain opset in which ReduceMean takes its axes as an input.
AXES_INPUT_OPSET = 18


@dataclasses.dataclass(frozen=True)
class LayerNormPlan:
    """A recognised LayerNorm: its first ReduceMean, its nodes in graph order, its input and output, and the fused
    operator's operands."""

    mean: ir.Node
    nodes: tuple[ir.Node, ...]
    data: ir.Value
    output: ir.Value
    last: ir.Node
    axis: int
    epsilon: float
    scale: np.ndarray
    bias: np.ndarray
    replaced_constants: tuple[ir.Value, ...]


@register
class FuseLayerNormalization(RewritePass):
    """Fuse a LayerNorm written out as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add into LayerNormalization."""

    phase = Phase.CANONICALIZE
    summary = "Fuse decomposed LayerNorm (torch.onnx, tf2onnx spellings) into LayerNormalization (opset >= 17)"

    def match(self, node: ir.Node, context: RewriteContext) -> ir.Node | None:
        """The ReduceMean computing the mean of a LayerNorm, read by ``Sub(x, mean)``."""
        if not is_op(node, "ReduceMean") or not node.inputs or node.inputs[0] is None:
            return None
        data, mean = node.inputs[0], node.outputs[0]
        for use in mean.uses():
            reader = use.node
            if is_op(reader, "Sub") and len(reader.inputs) == 2:
                if reader.inputs[0] is data and reader.inputs[1] is mean:
                    return node
        return None

    def check(self, match: ir.Node, context: RewriteContext) -> LayerNormPlan | Refusal:
        result = self._analyse(match, context.model)
        if isinstance(result, str):
            return Refusal(result)
        opset = default_opset(context.model)
        if opset < MINIMUM_OPSET:
            return OpsetRefusal(
                f"the model imports default-domain opset {opset}; LayerNormalization needs opset {MINIMUM_OPSET} "
                "(onnxruntime 1.19 has no com.microsoft LayerNormalization; UpgradeOpsetForFusions converts the "
                "model when the conversion is exact)",
                MINIMUM_OPSET,
            )
        return result

    def rewrite(self, plan: LayerNormPlan, context: RewriteContext) -> None:
        names = context.names
        graph = plan.mean.graph
        base = plan.mean.name or "layer_norm"
        scale = new_initializer(graph, names, f"{base}_scale", plan.scale)
        bias = new_initializer(graph, names, f"{base}_bias", plan.bias)
        fused = ir.Node(
            "",
            "LayerNormalization",
            [plan.data, scale, bias],
            attributes=[ir.AttrInt64("axis", plan.axis), ir.AttrFloat32("epsilon", plan.epsilon)],
            name=names.fresh(f"{base}_fused"),
        )
        ir.convenience.replace_nodes_and_values(
            graph, plan.last, plan.nodes, [fused], [plan.output], [fused.outputs[0]]
        )
        drop_unused_initializers(plan.replaced_constants)
        logger.debug("fused %d nodes into LayerNormalization %s (axis=%d)", len(plan.nodes), fused.name, plan.axis)

    # -- analysis ------------------------------------------------------------------------------------------------
    def _analyse(self, mean_node: ir.Node, model: ir.Model) -> LayerNormPlan | str:
        if not isinstance(mean_node.graph, ir.Graph):
            return "LayerNorm inside a function body (no initializers to hold the scale and bias)"
        opset = default_opset(model)
        data = mean_node.inputs[0]
        mean = mean_node.outputs[0]
        mean_axes = _reduce_axes(mean_node, opset)
        if isinstance(mean_axes, str):
            return mean_axes

        # μ is read only by Sub(x, μ) nodes: one (torch) or two (tf2onnx's SquaredDifference and numerator).
        subs = [use.node for use in mean.uses()]
        if mean.is_graph_output():
            return f"the mean {mean.name!r} is a graph output"
        strangers = [node for node in subs if not (is_op(node, "Sub") and node.inputs[0] is data)]
        if strangers:
            names = ", ".join(f"{node.op_type} {node.name!r}" for node in strangers)
            return f"the mean {mean.name!r} is also read by {names} (fan-out)"
        subs = list({id(node): node for node in subs}.values())
        if len(subs) > 2:
            return f"the mean {mean.name!r} feeds {len(subs)} Sub nodes"

        square = numerator = None
        for sub in subs:
            centred = sub.outputs[0]
            for use in centred.uses():
                reader = use.node
                if _is_square_of(reader, centred):
                    if square is not None and square is not reader:
                        return f"the centred input is squared twice ({square.name!r}, {reader.name!r})"
                    square = reader
                elif numerator is None or numerator is reader:
                    numerator = reader
                else:
                    return f"the centred input {centred.name!r} is also read by {reader.op_type} {reader.name!r}"
        if square is None:
            return "the centred input x - mean is never squared (Pow(d, 2) or Mul(d, d)): not a LayerNorm"
        if numerator is None:
            return "the centred input x - mean is never normalised: not a LayerNorm"
        centred_square = next(sub.outputs[0] for sub in subs if square in _readers(sub.outputs[0]))
        centred_numerator = next(sub.outputs[0] for sub in subs if numerator in _readers(sub.outputs[0]))
        if len(subs) == 2 and centred_square is centred_numerator:
            return "one of the two Sub(x, mean) nodes is not used"
        for sub in subs:
            refusal = private_value_refusal(sub.outputs[0], [square, numerator], "centred input")
            if refusal:
                return refusal

        # σ² = ReduceMean(d²) over the same axes, then ε is added before the square root.
        if sole_consumer(square.outputs[0]) is None:
            return sole_consumer_refusal(square.outputs[0], "the squared centred input")
        variance_node = sole_consumer(square.outputs[0])
        if not is_op(variance_node, "ReduceMean") or variance_node.inputs[0] is not square.outputs[0]:
            return "the squared centred input does not go (alone) into a ReduceMean"
        variance_axes = _reduce_axes(variance_node, opset)
        if isinstance(variance_axes, str):
            return variance_axes
        variance = variance_node.outputs[0]
        after_variance = sole_consumer(variance)
        if after_variance is None:
            return sole_consumer_refusal(variance, "the variance")
        epsilon_add = None
        epsilon_value = None
        if is_op(after_variance, "Add"):
            split = split_constant_operand(after_variance)
            if split is None or split[0] is not variance:
                return "the epsilon added to the variance is not a constant"
            epsilon_add, epsilon_value = after_variance, split[1]
            sqrt = sole_consumer(epsilon_add.outputs[0])
            if sqrt is None:
                return sole_consumer_refusal(epsilon_add.outputs[0], "the variance plus epsilon")
        else:
            sqrt = after_variance
        if not is_op(sqrt, "Sqrt"):
            return "the variance (plus epsilon) does not go (alone) into Sqrt"
        deviation = sqrt.outputs[0]
        after_sqrt = sole_consumer(deviation)
        if after_sqrt is None:
            return sole_consumer_refusal(deviation, "the standard deviation")
        reciprocal = None
        if is_op(after_sqrt, "Add") and epsilon_add is None:
            return (
                "epsilon is added after Sqrt: d / (sqrt(var) + eps) is not LayerNormalization's "
                "d / sqrt(var + eps), and no fused epsilon makes them equal for every input"
            )
        if is_op(after_sqrt, "Div"):
            if after_sqrt is not numerator or numerator.inputs[0] is not centred_numerator:
                return "the Div by the standard deviation does not divide the centred input"
            if numerator.inputs[1] is not deviation:
                return "the Div by the standard deviation divides the wrong way round"
        elif is_op(after_sqrt, "Reciprocal"):
            reciprocal = after_sqrt
            if sole_consumer(reciprocal.outputs[0]) is None:
                return sole_consumer_refusal(reciprocal.outputs[0], "the reciprocal standard deviation")
            if sole_consumer(reciprocal.outputs[0]) is not numerator or not is_op(numerator, "Mul"):
                return "the reciprocal standard deviation does not multiply the centred input (alone)"
            if {id(value) for value in numerator.inputs} != {id(centred_numerator), id(reciprocal.outputs[0])}:
                return "the Mul by the reciprocal standard deviation does not read the centred input"
        else:
            return f"the standard deviation goes into {after_sqrt.op_type} {after_sqrt.name!r}, not Div or Reciprocal"

        # Optional affine part: Mul(n, γ) then Add(·, β), each with a constant operand.
        output = numerator.outputs[0]
        scale_mul = bias_add = None
        scale_value = bias_value = None
        reader = sole_consumer(output)
        if is_op(reader, "Mul"):
            split = split_constant_operand(reader)
            if split is not None and split[0] is output:
                scale_mul, scale_value = reader, split[1]
                output = reader.outputs[0]
                reader = sole_consumer(output)
            else:
                logger.debug("Mul %r after a LayerNorm has no constant scale; left outside", reader.name)
        if is_op(reader, "Add"):
            split = split_constant_operand(reader)
            if split is not None and split[0] is output:
                bias_add, bias_value = reader, split[1]
                output = bias_add.outputs[0]

        nodes = [mean_node, *subs, square, variance_node]
        nodes += [node for node in (epsilon_add, sqrt, reciprocal, numerator, scale_mul, bias_add) if node is not None]
        return self._plan(
            nodes, data, output, mean_axes, variance_axes, epsilon_value, scale_value, bias_value, opset
        )

    def _plan(
        self,
        nodes: list[ir.Node],
        data: ir.Value,
        output: ir.Value,
        mean_axes: tuple[int, ...] | None,
        variance_axes: tuple[int, ...] | None,
        epsilon_value: ir.Value | None,
        scale_value: ir.Value | None,
        bias_value: ir.Value | None,
        opset: int,
    ) -> LayerNormPlan | str:
        rank, dtype = known_rank_and_dtype(data)
        constants = {
            role: constant_array(value)
            for role, value in (("epsilon", epsilon_value), ("scale", scale_value), ("bias", bias_value))
            if value is not None
        }
        if dtype is None:
            dtype = next((ir.DataType.from_numpy(array.dtype) for array in constants.values()), None)
        if dtype != ir.DataType.FLOAT:
            name = dtype.name if dtype is not None else "unknown"
            return f"element type {name}: only float32 LayerNorms are fused"
        for role, array in constants.items():
            if array.dtype != np.float32:
                return f"the {role} constant has element type {array.dtype}, not float32"

        axes = _trailing_axes(mean_axes, rank)
        if isinstance(axes, str):
            return axes
        if _trailing_axes(variance_axes, rank) != axes:
            return "the two ReduceMean nodes reduce different axes"
        count = axes

        epsilon = 0.0
        if "epsilon" in constants:
            array = constants["epsilon"]
            epsilon = float(array.reshape(-1)[0]) if array.size == 1 else float("nan")
            if array.size != 1 or not np.isfinite(epsilon) or epsilon < 0:
                return f"epsilon must be one finite non-negative number, got shape {array.shape}"
            if rank is not None and array.ndim > rank:
                return "the epsilon constant has a higher rank than the input (it would broadcast the output)"

        try:
            parameters = {role: constants.get(role) for role in ("scale", "bias")}
            shape = normalized_axes_shape(data, rank, count, parameters)
        except Refused as refusal:
            return str(refusal)
        scale = broadcast_parameter(constants.get("scale"), shape, 1.0)
        bias = broadcast_parameter(constants.get("bias"), shape, 0.0)

        # Every intermediate value is private to the chain (the output is the only one read outside it).
        members = {id(node) for node in nodes}
        for node in nodes:
            for value in node.outputs:
                if value is output:
                    continue
                readers = [use.node for use in value.uses() if id(use.node) in members]
                refusal = private_value_refusal(value, readers, f"{node.op_type} output")
                if refusal:
                    return refusal

        replaced = [value for node in nodes for value in node.inputs if value is not None and value.is_initializer()]
        mean_node = nodes[0]  # _analyse lists the first ReduceMean first
        graph_order = {id(node): index for index, node in enumerate(mean_node.graph)}
        nodes = sorted(nodes, key=lambda node: graph_order[id(node)])
        return LayerNormPlan(
            mean=mean_node,
            nodes=tuple(nodes),
            data=data,
            output=output,
            last=nodes[-1],
            axis=-count,
            epsilon=epsilon,
            scale=scale,
            bias=bias,
            replaced_constants=tuple(replaced),
        )


def _readers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def _is_square_of(node: ir.Node, value: ir.Value) -> bool:
    """``node`` is ``Pow(value, 2)`` or ``Mul(value, value)``."""
    if is_op(node, "Mul") and len(node.inputs) == 2:
        return node.inputs[0] is value and node.inputs[1] is value
    if is_op(node, "Pow") and len(node.inputs) == 2 and node.inputs[0] is value:
        return scalar_constant(node.inputs[1]) == 2.0
    return False


def _reduce_axes(node: ir.Node, opset: int) -> tuple[int, ...] | None | str:
    """The axes a ReduceMean reduces (``None``: all of them), or why they are not usable."""
    keepdims = node.attributes.get("keepdims")
    if keepdims is not None and keepdims.as_int() != 1:
        return f"ReduceMean {node.name!r} has keepdims=0 (LayerNormalization broadcasts a kept dimension)"
    if opset >= AXES_INPUT_OPSET:
        axes_value = node.inputs[1] if len(node.inputs) > 1 else None
        if axes_value is None:
            noop = node.attributes.get("noop_with_empty_axes")
            if noop is not None and noop.as_int() == 1:
                return f"ReduceMean {node.name!r} reduces nothing (noop_with_empty_axes=1)"
            return None
        axes = constant_array(axes_value)
        if axes is None:
            return f"the axes of ReduceMean {node.name!r} are not a constant"
        return tuple(int(axis) for axis in axes.reshape(-1))
    axes_attribute = node.attributes.get("axes")
    if axes_attribute is None:
        return None
    return tuple(int(axis) for axis in axes_attribute.as_ints())


def _trailing_axes(axes: tuple[int, ...] | None, rank: int | None) -> int | str:
    """How many trailing axes ``axes`` are (k), or why they are not the last k axes of a rank-``rank`` input."""
    if axes is None:
        if rank is None:
            return "ReduceMean reduces every axis of an input of unknown rank"
        return rank
    if not axes:
        return "ReduceMean has an empty axes list"
    if rank is None:
        if any(axis >= 0 for axis in axes):
            return f"axes {list(axes)} are not negative and the input rank is unknown"
        normalized = sorted(set(axes))
        count = len(normalized)
        if normalized != list(range(-count, 0)) or len(axes) != count:
            return f"axes {list(axes)} are not the trailing axes"
        return count
    if any(axis < -rank or axis >= rank for axis in axes):
        return f"axes {list(axes)} are out of range for rank {rank}"
    normalized = sorted({axis % rank for axis in axes})
    count = len(normalized)
    if normalized != list(range(rank - count, rank)) or len(axes) != count:
        return f"axes {list(axes)} are not the trailing axes of a rank-{rank} input"
    return count

"""Recognise a normalisation ``y = (x − μ) · rsqrt(σ² + ε) · γ + β`` or ``y = x · rsqrt(E[x²] + ε) · γ`` in any of
the spellings exporters write, for FuseGeneralLayerNormalization and FuseRmsNormalization.

Not a pass (the leading underscore keeps the catalog from importing it as one). The match starts at the node that
multiplies (or divides) the data by the reciprocal standard deviation and reads the graph backwards. With
``A`` the k trailing axes of x and ``n = ∏_{a∈A} dim_a``, the statistics may be spelled:

- a mean over A: ``ReduceMean(v, A)``, ``Mul(ReduceSum(v, A), 1/n)`` or ``Div(ReduceSum(v, A), n)``, with
  ``keepdims`` 1 or 0; a mean computed with keepdims=0 is brought back to x's rank with ``Reshape`` (to x's shape
  with 1 on the axes A) or ``Unsqueeze(A)``, and a kept statistic may be broadcast to x's shape with ``Expand``
  (jax2tf writes ``broadcast_in_dim`` as TF ``BroadcastTo``, which tf2onnx turns into ``Expand``);
- a square: ``Mul(v, v)`` or ``Pow(v, 2)``;
- the variance, centred: mean((x − μ)²), or from the moments: ``E[x²] − E[x]²`` (flax's ``_compute_stats``),
  optionally clamped ``Max(·, 0)`` (flax guards the cancellation; exact since the true value is ≥ 0);
- ``rsqrt(s + ε)``: ``Reciprocal(Sqrt(·))`` (tf2onnx's Rsqrt), ``Pow(·, −0.5)``, ``Div(1, Sqrt(·))``, or a
  ``Div(·, Sqrt(·))`` by the standard deviation; ε may be absent (0);
- γ: after the product (``Mul(y, γ)``), or folded into the reciprocal before it (Keras and flax:
  ``mul = rsqrt(σ² + ε) · γ``, then ``(x − μ) · mul``); β: ``Add(·, β)`` after.

Shapes are followed as kinds: a statistic reduced with keepdims=0 is *flat* (x's shape without A), one with the
axes kept, reshaped or unsqueezed back, or expanded is *row*-aligned with x. Element-wise arithmetic between
statistics must not mix the two kinds (a flat value broadcast against x aligns with the wrong axes), and only a
row-aligned statistic may meet x. That makes every accepted spelling the same function as the fused operator.

Refused with a reason (the caller logs it): an intermediate value read outside the match or that is a graph output
(fan-out), a ReduceSum whose divisor is not the element count of the reduced axes, axes that are not trailing or
differ between the statistics, a view whose shape constant does not have that form, element types other than
float32, constants whose shape would broadcast the output.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import numpy as np
import onnx_ir as ir

from qgraph.passes._rewrite_support import constant_array, known_rank_and_dtype
from qgraph.passes.canonicalize._pattern_matching import (
    close_to,
    default_opset,
    is_op,
    private_value_refusal,
    scalar_constant,
    split_constant_operand,
)
from qgraph.passes.infrastructure import Phase, Refusal, RewriteContext, RewritePass

#: Relative tolerance on 1/n, n, 2, −0.5 and 0 constants (exporters print 1/n with 7–9 significant digits).
CONSTANT_TOLERANCE = 1e-5
#: The first default-domain opset in which ReduceMean/ReduceSum take their axes as an input.
_AXES_INPUT_OPSET = {"ReduceMean": 18, "ReduceSum": 13}
_UNSQUEEZE_AXES_INPUT_OPSET = 13

FLAT = "flat"
ROW = "row"


class Refused(Exception):
    """Raised inside the analysis with the reason a fusion is refused."""


class NotANormalization(Refused):
    """Raised when the node is no normalisation at all (no log line: most Muls of a model are not one)."""


@dataclasses.dataclass(frozen=True)
class NormalizationMatch:
    """A recognised normalisation: ``centred`` (LayerNorm) or not (RMSNorm), the data x, the output, the nodes."""

    centred: bool
    data: ir.Value
    output: ir.Value
    nodes: tuple[ir.Node, ...]
    axis_count: int
    epsilon: float
    scale: np.ndarray | None
    bias: np.ndarray | None
    normalized_shape: tuple[int, ...]


@dataclasses.dataclass
class _Context:
    rank: int
    data: ir.Value | None
    opset: int
    nodes: list[ir.Node]

    def take(self, node: ir.Node) -> None:
        if all(node is not member for member in self.nodes):
            self.nodes.append(node)


@dataclasses.dataclass(frozen=True)
class _Statistic:
    """What a value computes: ``what`` ("mean", "mean_square", "centred_variance", "square_mean", …), its kind."""

    what: str
    kind: str
    axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What :func:`analysis_of` found at a node: the match, or the reason a near-miss is refused."""

    node: ir.Node
    result: NormalizationMatch | str


def analysis_of(node: ir.Node, model: ir.Model, *, centred: bool) -> Analysis | None:
    """The LayerNorm (``centred``) or RMSNorm whose product with the reciprocal root is ``node``.

    ``None`` when ``node`` is not such a product at all or computes the other normalisation; an Analysis holding
    the reason when it is a near-miss (the caller refuses with it).
    """
    if not (is_op(node, "Mul") or is_op(node, "Div")) or len(node.inputs) != 2:
        return None
    if any(value is None for value in node.inputs) or all(value.producer() is None for value in node.inputs):
        return None
    try:
        found = analyse(node, model)
    except NotANormalization:
        return None
    except Refused as refusal:
        reasons = str(refusal).split("; ")
        other = "an RMSNorm numerator" if centred else "a LayerNorm numerator"
        if all(other in reason for reason in reasons):
            return None
        return Analysis(node, str(refusal))
    if found.centred != centred:
        return None
    return Analysis(node, found)


def analyse(product: ir.Node, model: ir.Model) -> NormalizationMatch:
    """The normalisation whose product with the reciprocal standard deviation is ``product``; raises Refused."""
    if not isinstance(product.graph, ir.Graph):
        raise Refused("a normalisation inside a function body (no initializers to hold the scale and bias)")
    opset = default_opset(model)
    candidates = [(product.inputs[0], product.inputs[1])]
    if is_op(product, "Mul"):
        candidates.append((product.inputs[1], product.inputs[0]))
    refusals: list[Refused] = []
    for numerator, factor in candidates:
        try:
            if constant_array(numerator) is not None:
                raise NotANormalization("the numerator is a constant")
            return _analyse(product, numerator, factor, opset)
        except Refused as refusal:
            refusals.append(refusal)
    near_misses = [str(refusal) for refusal in refusals if not isinstance(refusal, NotANormalization)]
    if not near_misses:
        raise NotANormalization("; ".join(str(refusal) for refusal in refusals))
    raise Refused("; ".join(dict.fromkeys(near_misses)))


def _analyse(product: ir.Node, numerator: ir.Value, factor: ir.Value, opset: int) -> NormalizationMatch:
    # The numerator is x (RMSNorm) or Sub(x, μ) (LayerNorm); find x first, since every statistic is about it.
    centring = numerator.producer()
    if is_op(centring, "Sub") and len(centring.inputs) == 2:
        data, centred = centring.inputs[0], True
    else:
        data, centred = numerator, False
    rank, dtype = known_rank_and_dtype(data)
    if rank is None:
        raise NotANormalization("the rank of the normalised input is unknown")
    if dtype is not None and dtype != ir.DataType.FLOAT:
        raise Refused(f"element type {dtype.name}: only float32 normalisations are fused")
    context = _Context(rank, data, opset, [product])
    if centred:
        mean = _statistic(centring.inputs[1], context)
        if mean.what != "mean" or mean.kind != ROW:
            raise Refused("Sub(x, ·) does not subtract the row mean of x")
        context.take(centring)
        axes = mean.axes
    folded_scale = None
    if is_op(product, "Div"):
        root, epsilon = _square_root(factor, context)
    else:
        folded_scale, inner = _folded_scale(factor, context)
        root, epsilon = _reciprocal_square_root(inner, context)
    variance = _statistic(root, context)
    if variance.kind != ROW:
        raise Refused("the standard deviation is not aligned with the rows of x (keepdims=0 without a Reshape)")
    expected = {"centred_variance", "moment_variance"} if centred else {"mean_square"}
    if variance.what not in expected:
        shape = "a LayerNorm" if centred else "an RMSNorm"
        raise Refused(f"{shape} numerator divided by the root of a {variance.what.replace('_', ' ')}")
    if centred and variance.axes != axes:
        raise Refused("the mean and the variance reduce different axes")
    axes = variance.axes
    count = len(axes)

    output = product.outputs[0]
    scale = constant_array(folded_scale) if folded_scale is not None else None
    bias = None
    reader = _sole_reader(output)
    if folded_scale is None and is_op(reader, "Mul"):
        split = split_constant_operand(reader)
        if split is not None and split[0] is output:
            scale, output = constant_array(split[1]), reader.outputs[0]
            context.take(reader)
            reader = _sole_reader(output)
    if is_op(reader, "Add"):
        split = split_constant_operand(reader)
        if split is not None and split[0] is output:
            bias, output = constant_array(split[1]), reader.outputs[0]
            context.take(reader)

    normalized_shape = normalized_axes_shape(data, rank, count, {"scale": scale, "bias": bias})
    for node in context.nodes:
        for value in node.outputs:
            if value is output:
                continue
            readers = [use.node for use in value.uses() if any(use.node is member for member in context.nodes)]
            refusal = private_value_refusal(value, readers, f"{node.op_type} output")
            if refusal:
                raise Refused(refusal)
    return NormalizationMatch(
        centred, data, output, tuple(context.nodes), count, epsilon, scale, bias, normalized_shape
    )


def _sole_reader(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    return next(iter(uses)).node


# -- the reciprocal standard deviation ----------------------------------------------------------------------------
def _folded_scale(value: ir.Value, context: _Context) -> tuple[ir.Value | None, ir.Value]:
    """``Mul(r, γ)`` with a constant γ (Keras/flax fold the scale into the reciprocal): ``(γ, r)``; else no γ."""
    value, _ = _strip_expand(value, context)
    producer = value.producer()
    if is_op(producer, "Mul"):
        split = split_constant_operand(producer)
        if split is not None and constant_array(split[1]).size > 1:
            context.take(producer)
            return split[1], split[0]
    return None, value


def _reciprocal_square_root(value: ir.Value, context: _Context) -> tuple[ir.Value, float]:
    """``rsqrt(s + ε)`` as Reciprocal(Sqrt), Pow(·, −0.5) or Div(1, Sqrt): ``(s, ε)``."""
    value, _ = _strip_expand(value, context)
    producer = value.producer()
    if is_op(producer, "Reciprocal"):
        context.take(producer)
        return _square_root(producer.inputs[0], context)
    if is_op(producer, "Div") and len(producer.inputs) == 2 and close_to(scalar_constant(producer.inputs[0]), 1.0,
                                                                           CONSTANT_TOLERANCE):
        _scalar_refusal(producer.inputs[0], context)
        context.take(producer)
        return _square_root(producer.inputs[1], context)
    if is_op(producer, "Pow") and len(producer.inputs) == 2:
        if not close_to(scalar_constant(producer.inputs[1]), -0.5, CONSTANT_TOLERANCE):
            raise Refused(f"Pow {producer.name!r} has an exponent other than -0.5")
        _scalar_refusal(producer.inputs[1], context)
        context.take(producer)
        return _plus_epsilon(producer.inputs[0], context)
    kind = producer.op_type if producer is not None else "a graph input"
    raise NotANormalization(f"the factor is {kind}, not a reciprocal square root")


def _square_root(value: ir.Value, context: _Context) -> tuple[ir.Value, float]:
    value, _ = _strip_expand(value, context)
    producer = value.producer()
    if not is_op(producer, "Sqrt"):
        kind = producer.op_type if producer is not None else "a graph input"
        raise NotANormalization(f"the divisor is {kind}, not a square root")
    context.take(producer)
    return _plus_epsilon(producer.inputs[0], context)


def _plus_epsilon(value: ir.Value, context: _Context) -> tuple[ir.Value, float]:
    producer = value.producer()
    if is_op(producer, "Add"):
        split = split_constant_operand(producer)
        if split is not None:
            epsilon = scalar_constant(split[1])
            if epsilon is None or not math.isfinite(epsilon) or epsilon < 0:
                raise Refused("epsilon must be one finite non-negative number")
            _scalar_refusal(split[1], context)
            context.take(producer)
            return split[0], epsilon
    return value, 0.0


# -- statistics ---------------------------------------------------------------------------------------------------
def _statistic(value: ir.Value, context: _Context) -> _Statistic:
    """What ``value`` computes from x, read backwards through views and element-wise arithmetic."""
    producer = value.producer()
    if producer is None:
        raise Refused(f"{value.name!r} is not computed from x")
    op = producer.op_type if producer.domain in ("", "ai.onnx") else None
    if op in ("Reshape", "Unsqueeze", "Expand"):
        inner = _statistic(producer.inputs[0], context)
        kind = _view_kind(producer, inner, context)
        context.take(producer)
        return dataclasses.replace(inner, kind=kind)
    if op in ("ReduceMean", "ReduceSum"):
        return _reduction(producer, producer, context)
    if op in ("Mul", "Div") and len(producer.inputs) == 2:
        split = split_constant_operand(producer)
        if split is not None and split[0].producer() is not None and is_op(split[0].producer(), "ReduceSum"):
            return _reduction(split[0].producer(), producer, context)
    if op == "Max" and len(producer.inputs) == 2:
        split = split_constant_operand(producer)
        if split is not None and scalar_constant(split[1]) == 0.0:
            _scalar_refusal(split[1], context)
            inner = _statistic(split[0], context)
            if inner.what != "moment_variance":
                raise Refused("Max(·, 0) clamps something other than E[x²] − E[x]²")
            context.take(producer)
            return inner
    if op == "Sub" and len(producer.inputs) == 2:
        second_moment = _statistic(producer.inputs[0], context)
        square_mean = _statistic(producer.inputs[1], context)
        if second_moment.what != "mean_square" or square_mean.what != "square_mean":
            raise Refused("a Sub between statistics that is not E[x²] − E[x]²")
        if second_moment.axes != square_mean.axes or second_moment.kind != square_mean.kind:
            raise Refused("E[x²] and E[x]² reduce different axes or have different shapes")
        context.take(producer)
        return _Statistic("moment_variance", second_moment.kind, second_moment.axes)
    squared = _square_operand(producer)
    if squared is not None:
        inner = _statistic(squared, context)
        if inner.what != "mean":
            raise Refused("a square of a statistic that is not the mean")
        context.take(producer)
        return _Statistic("square_mean", inner.kind, inner.axes)
    raise Refused(f"{producer.op_type} {producer.name!r} is not part of a normalisation statistic")


def _reduction(reduce: ir.Node, last: ir.Node, context: _Context) -> _Statistic:
    """A mean over the trailing axes: ReduceMean, or ReduceSum then ``last`` = Mul(·, 1/n) / Div(·, n)."""
    axes, keepdims = _reduce_axes(reduce, context)
    if reduce.op_type == "ReduceSum":
        if last is reduce:
            raise Refused("a ReduceSum that is not divided by the element count")
        dims = context.data.shape if context.data is not None else None
        sizes = [dims[axis] if dims is not None and len(dims) == context.rank else None for axis in axes]
        if any(not isinstance(size, int) for size in sizes):
            raise Refused("a ReduceSum over axes of unknown size (the mean's divisor cannot be checked)")
        count = float(np.prod(sizes))
        split = split_constant_operand(last)
        expected = 1.0 / count if last.op_type == "Mul" else count
        if last.op_type == "Div" and last.inputs[0] is not reduce.outputs[0]:
            raise Refused(f"Div {last.name!r} divides a constant by the ReduceSum")
        if split is None or split[0] is not reduce.outputs[0] or not close_to(
                scalar_constant(split[1]), expected, CONSTANT_TOLERANCE):
            raise Refused(f"ReduceSum {reduce.name!r} is not scaled by 1/{count:g}")
        _scalar_refusal(split[1], context)
        context.take(last)
    source = reduce.inputs[0]
    if source is context.data:
        what = "mean"
    else:
        squared = _square_operand(source.producer())
        if squared is None:
            raise Refused(f"{reduce.op_type} {reduce.name!r} reduces neither x nor a square")
        context.take(source.producer())
        if squared is context.data:
            what = "mean_square"
        else:
            centring = squared.producer()
            if not (is_op(centring, "Sub") and len(centring.inputs) == 2 and centring.inputs[0] is context.data):
                raise Refused(f"{reduce.op_type} {reduce.name!r} reduces the square of something other than x or x − μ")
            mean = _statistic(centring.inputs[1], context)
            if mean.what != "mean" or mean.kind != ROW or mean.axes != axes:
                raise Refused("the centred square subtracts something other than the row mean over the same axes")
            context.take(centring)
            what = "centred_variance"
    context.take(reduce)
    return _Statistic(what, ROW if keepdims else FLAT, axes)


def _square_operand(node: ir.Node | None) -> ir.Value | None:
    """v for ``Mul(v, v)`` or ``Pow(v, 2)``; else ``None``."""
    if is_op(node, "Mul") and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    if is_op(node, "Pow") and len(node.inputs) == 2 and scalar_constant(node.inputs[1]) == 2.0:
        return node.inputs[0]
    return None


def _reduce_axes(node: ir.Node, context: _Context) -> tuple[tuple[int, ...], bool]:
    """The trailing axes (normalised to negatives) a ReduceMean/ReduceSum reduces, and its keepdims."""
    keepdims_attribute = node.attributes.get("keepdims")
    keepdims = keepdims_attribute is None or keepdims_attribute.as_int() == 1
    if context.opset >= _AXES_INPUT_OPSET[node.op_type]:
        axes_value = node.inputs[1] if len(node.inputs) > 1 else None
        if axes_value is None:
            axes = tuple(range(context.rank))
        else:
            array = constant_array(axes_value)
            if array is None:
                raise Refused(f"the axes of {node.op_type} {node.name!r} are not a constant")
            axes = tuple(int(axis) for axis in array.reshape(-1))
    else:
        attribute = node.attributes.get("axes")
        axes = tuple(attribute.as_ints()) if attribute is not None else tuple(range(context.rank))
    return _trailing(axes, context.rank, f"{node.op_type} {node.name!r}"), keepdims


def _trailing(axes: tuple[int, ...], rank: int, role: str) -> tuple[int, ...]:
    if not axes or any(axis < -rank or axis >= rank for axis in axes):
        raise Refused(f"{role} has axes {list(axes)} out of range for rank {rank}")
    normalized = sorted({axis % rank for axis in axes})
    if len(normalized) != len(axes) or normalized != list(range(rank - len(axes), rank)):
        raise Refused(f"{role} reduces axes {list(axes)}, not the trailing axes of a rank-{rank} input")
    return tuple(axis - rank for axis in normalized)


# -- views --------------------------------------------------------------------------------------------------------
def _strip_expand(value: ir.Value, context: _Context) -> tuple[ir.Value, bool]:
    """The value before an ``Expand`` to x's shape (jax2tf's explicit broadcast), and whether there was one."""
    producer = value.producer()
    if is_op(producer, "Expand"):
        _check_expand_shape(producer, context)
        context.take(producer)
        return producer.inputs[0], True
    return value, False


def _view_kind(view: ir.Node, inner: _Statistic, context: _Context) -> str:
    """The kind of a Reshape/Unsqueeze/Expand of the statistic ``inner``; raises Refused for other views."""
    rank, kind = context.rank, inner.kind
    dims = context.data.shape if context.data is not None and context.data.shape is not None else None
    static = [dims[index] if dims is not None and len(dims) == rank else None for index in range(rank)]
    if view.op_type == "Expand":
        if kind != ROW:
            raise Refused(f"Expand {view.name!r} broadcasts a statistic that is not row-aligned")
        _check_expand_shape(view, context)
        return ROW
    if view.op_type == "Unsqueeze":
        if context.opset >= _UNSQUEEZE_AXES_INPUT_OPSET:
            axes_array = constant_array(view.inputs[1]) if len(view.inputs) > 1 else None
            axes = tuple(int(axis) for axis in axes_array.reshape(-1)) if axes_array is not None else None
        else:
            attribute = view.attributes.get("axes")
            axes = tuple(attribute.as_ints()) if attribute is not None else None
        if kind != FLAT or axes is None:
            raise Refused(f"Unsqueeze {view.name!r} is not the re-insertion of the reduced axes")
        _trailing(axes, rank, f"Unsqueeze {view.name!r}")
        return ROW
    shape = constant_array(view.inputs[1]) if len(view.inputs) > 1 else None
    allowzero = view.attributes.get("allowzero")
    if shape is None or len(shape) != rank or (allowzero is not None and allowzero.as_int() == 1):
        raise Refused(f"Reshape {view.name!r} of a statistic has no constant shape of x's rank")
    count = len(inner.axes)
    leading, trailing = [int(size) for size in shape[: rank - count]], [int(size) for size in shape[rank - count:]]
    if any(size != 1 for size in trailing):
        raise Refused(f"Reshape {view.name!r} to {shape.tolist()} does not keep the reduced axes as 1")
    inferred = sum(1 for size in leading if size == -1)
    for index, size in enumerate(leading):
        if size in (0, -1):
            continue
        if static[index] != size:
            raise Refused(f"Reshape {view.name!r} to {shape.tolist()} changes the rows of x")
    if inferred > 1:
        raise Refused(f"Reshape {view.name!r} to {shape.tolist()} has more than one inferred dimension")
    return ROW


def _check_expand_shape(expand: ir.Node, context: _Context) -> None:
    """Expand's target is x's shape: ``Shape(x)``, or a constant of 1s and x's static dimensions."""
    target = expand.inputs[1] if len(expand.inputs) > 1 else None
    if target is None:
        raise Refused(f"Expand {expand.name!r} has no shape")
    producer = target.producer()
    if is_op(producer, "Shape") and producer.inputs[0] is context.data and not producer.attributes:
        return
    shape = constant_array(target)
    dims = context.data.shape if context.data is not None else None
    if shape is None or dims is None or len(dims) != context.rank or len(shape) > context.rank:
        raise Refused(f"Expand {expand.name!r} broadcasts to a shape that is not x's")
    for size, dim in zip(reversed(shape.tolist()), reversed(list(dims))):
        if size != 1 and size != dim:
            raise Refused(f"Expand {expand.name!r} to {shape.tolist()} changes the shape of x")


# -- constants ----------------------------------------------------------------------------------------------------
def _scalar_refusal(value: ir.Value, context: _Context) -> None:
    """Refuse a one-element constant whose rank would broadcast x's shape."""
    array = constant_array(value)
    if array is None:
        raise Refused(f"{getattr(value, 'name', None)!r} is not a constant")
    if array.ndim > context.rank:
        raise Refused(f"the constant {value.name!r} has a higher rank than x (it would broadcast the output)")


def normalized_axes_shape(
    data: ir.Value, rank: int | None, count: int, constants: dict[str, np.ndarray | None]
) -> tuple[int, ...]:
    """The static shape of the normalised (last ``count``) axes, from x's shape and γ/β; raises Refused.

    γ and β must be float32 and vary over the normalised axes only: a constant of higher rank than x, or with a
    non-1 size on a leading axis, would broadcast the output. With x's rank unknown (``rank`` None) a constant of
    more than ``count`` axes may broadcast it and is refused too.
    """
    dims: list[int | None] = [None] * count
    if data.shape is not None and rank is not None and len(data.shape) == rank:
        for index in range(count):
            dim = data.shape[rank - count + index]
            dims[index] = dim if isinstance(dim, int) else None
    for role, array in constants.items():
        if array is None:
            continue
        if array.dtype != np.float32:
            raise Refused(f"the {role} constant has element type {array.dtype}, not float32")
        if rank is not None and array.ndim > rank:
            raise Refused(f"the {role} constant has a higher rank than the input (it would broadcast the output)")
        if any(size != 1 for size in array.shape[: max(0, array.ndim - count)]):
            raise Refused(f"the {role} constant of shape {array.shape} varies over non-normalised axes")
        if rank is None and array.ndim > count:
            raise Refused(f"the {role} constant of shape {array.shape} may broadcast the output (input rank unknown)")
        trailing = array.shape[max(0, array.ndim - count):]
        for offset, size in enumerate(trailing):
            index = count - len(trailing) + offset
            if size == 1:
                continue
            if dims[index] is None:
                dims[index] = size
            elif dims[index] != size:
                raise Refused(f"the {role} constant of shape {array.shape} does not broadcast to the normalised axes")
    if any(dim is None for dim in dims):
        raise Refused("the normalised axes have no static size (the fused operator's scale needs one)")
    return tuple(int(dim) for dim in dims)


def broadcast_parameter(array: np.ndarray | None, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """γ or β as an array of the normalised shape (``fill`` where the graph has none)."""
    if array is None:
        return np.full(shape, fill, np.float32)
    trailing = array.reshape(array.shape[max(0, array.ndim - len(shape)):])
    return np.ascontiguousarray(np.broadcast_to(trailing, shape), dtype=np.float32)


class NormalizationFusion(RewritePass):
    """A CANONICALIZE fusion of the LayerNorms (``centred``) or RMSNorms that :func:`analysis_of` finds.

    ``match`` is the Mul (or Div) that applies the reciprocal root to x − μ (or x), analysed; ``check`` refuses a
    near-miss with its reason and hands a full match to ``plan``.
    """

    phase = Phase.CANONICALIZE
    centred: bool

    @abc.abstractmethod
    def plan(self, found: NormalizationMatch, context: RewriteContext) -> object | Refusal:
        """What ``rewrite`` needs to fuse ``found``, or the refusal."""

    def match(self, node: ir.Node, context: RewriteContext) -> Analysis | None:
        return analysis_of(node, context.model, centred=self.centred)

    def check(self, match: Analysis, context: RewriteContext) -> object | Refusal:
        if isinstance(match.result, str):
            return Refusal(match.result)
        return self.plan(match.result, context)

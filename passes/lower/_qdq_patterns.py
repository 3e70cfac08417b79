"""Shared matching and rewriting helpers for the LOWER passes that read the QDQ form of docs/qdq-format.md.

Vocabulary used throughout (the quantization of a real value ``r`` stored as the integer ``q``):

    r = (q - z) · s                                   DequantizeLinear(q, s, z)
    q = saturate(round_half_to_even(r / s) + z)       QuantizeLinear(r, s, z), saturate to [qmin, qmax]

A LOWER pass looks for an *island* ``DQ(inputs) → op → [activation] → Q(output)`` and replaces it by one integer
operator that reads the DQ inputs' integer tensors and writes the Q output's integer tensor. The helpers here read
the quantization parameters of Q/DQ nodes (they must be constant initializers), find the output quantization of an
op, decide whether a Relu/Clip between the op and its Q is implied by the output range, move the uses of a value to
its replacement (graph outputs keep their names), add constants, and remove the nodes that a rewrite left unused.
The questions every pass asks (is a node a given operator, is a value a constant, which node is its sole consumer,
which opset the model imports) and the fresh names of new constants come from :mod:`qgraph.ir` and are re-exported
here, so that a lowering pass reads them as ``qdq.is_op`` like the rest of this vocabulary.

Activation implied by the output range: with ``Q`` monotone and saturating at ``[qmin, qmax]``,
``Q(clip(v, lo, hi)) == Q(v)`` for every ``v`` exactly when ``Q(lo) == qmin`` and ``Q(hi) == qmax``, i.e.
``round(lo / s) + z <= qmin`` and ``round(hi / s) + z >= qmax`` (an absent bound is ±infinity). Relu is
``Clip(0, +inf)``, implied exactly when ``z == qmin``.

Kernel weights on CPUs without VNNI: onnxruntime's u8·s8 kernels on AVX2 multiply with VPMADDUBSW, which adds two
adjacent uint8·int8 products into a saturating int16. With activations up to 255 the pair sum stays exact only when
``|w_k| + |w_{k+1}| <= 128`` — guaranteed when every stored weight satisfies ``|w| <= 64`` (7-bit, "reduce_range").
Measured on this project's AVX2 machine with onnxruntime 1.19.2: 255·127 sums saturate (MatMulInteger gives 1048544
instead of 2072640). For wider weights the passes store the weight as uint8 instead, ``w_u8 = w_s8 + 128`` and
``z_u8 = z_s8 + 128``, which dequantizes to the same real values and runs on the u8·u8 kernels, which widen to int16
before multiplying and never saturate.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer, take_over  # noqa: F401 - used as qdq.take_over
from qgraph.ir.naming import NameScope
from qgraph.ir.values import (  # noqa: F401 - re-exported for the lowering passes
    MICROSOFT_DOMAIN,
    constant_array,
    default_opset,
    ensure_microsoft_domain,
    is_op,
    sole_consumer,
)

logger = logging.getLogger(__name__)

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"

#: Largest stored int8 weight magnitude for which the AVX2 u8·s8 kernels cannot saturate (see module docstring).
SAFE_INT8_WEIGHT_MAGNITUDE = 64

_INTEGER_RANGES = {
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
}


def attribute(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """The constant parameters of one QuantizeLinear or DequantizeLinear node."""

    node: ir.Node
    integer_value: ir.Value  # DQ: the integer input; Q: the integer output
    scale: ir.Value
    zero_point: ir.Value | None
    scale_array: np.ndarray
    zero_point_array: np.ndarray
    integer_type: ir.DataType
    axis: int

    @property
    def per_tensor(self) -> bool:
        return self.scale_array.size == 1

    @property
    def qmin(self) -> int:
        return _INTEGER_RANGES[self.integer_type][0]

    @property
    def qmax(self) -> int:
        return _INTEGER_RANGES[self.integer_type][1]

    def scalar_scale(self) -> float:
        return float(self.scale_array.reshape(-1)[0])

    def scalar_zero_point(self) -> int:
        return int(self.zero_point_array.reshape(-1)[0])

    def same_as(self, other: QuantParams) -> bool:
        """Identical quantization: same integer type, same scale and zero point values (and axis if per-channel)."""
        if self.integer_type != other.integer_type or self.per_tensor != other.per_tensor:
            return False
        if not self.per_tensor and self.axis != other.axis:
            return False
        return bool(
            np.array_equal(self.scale_array.reshape(-1), other.scale_array.reshape(-1))
            and np.array_equal(
                self.zero_point_array.reshape(-1).astype(np.int64), other.zero_point_array.reshape(-1).astype(np.int64)
            )
        )


def read_params(node: ir.Node) -> QuantParams | str:
    """The parameters of a Q or DQ node, or the reason they cannot be used for lowering."""
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    scale_array = constant_array(scale)
    if scale_array is None:
        return f"the scale of {node.op_type} {node.name} is not a constant initializer"
    if scale_array.dtype != np.float32:
        return f"the scale of {node.op_type} {node.name} is {scale_array.dtype}, not float32"
    if zero_point is not None:
        zero_point_array = constant_array(zero_point)
        if zero_point_array is None:
            return f"the zero point of {node.op_type} {node.name} is not a constant initializer"
        if zero_point_array.shape != scale_array.shape:
            return f"the zero point and scale of {node.op_type} {node.name} have different shapes"
    else:
        zero_point_array = np.zeros(scale_array.shape, np.int64)
    if attribute(node, "block_size", 0):
        return f"{node.op_type} {node.name} is blocked (block_size), which no integer kernel here takes"
    if node.op_type == DEQUANTIZE:
        integer_value = node.inputs[0]
        integer_type = integer_value.dtype
    else:
        integer_value = node.outputs[0]
        if zero_point is not None:
            integer_type = zero_point.dtype
        else:
            integer_type = ir.DataType(attribute(node, "output_dtype", 0) or ir.DataType.UINT8)
    if integer_type not in _INTEGER_RANGES:
        return f"{node.op_type} {node.name} has integer type {integer_type}, not uint8/int8/int32"
    if scale_array.ndim > 1:
        return f"the scale of {node.op_type} {node.name} has rank {scale_array.ndim} (only scalar or 1-D)"
    return QuantParams(
        node=node,
        integer_value=integer_value,
        scale=scale,
        zero_point=zero_point,
        scale_array=scale_array,
        zero_point_array=zero_point_array,
        integer_type=integer_type,
        axis=int(attribute(node, "axis", 1)),
    )


def pair_mismatch(quantize: ir.Node, dequantize: ir.Node) -> str | None:
    """Why a QuantizeLinear and a DequantizeLinear are not each other's inverse (unreadable or different
    parameters: the pair requantizes), or None when they quantize alike."""
    quantize_params, dequantize_params = read_params(quantize), read_params(dequantize)
    for params in (quantize_params, dequantize_params):
        if isinstance(params, str):
            return params
    if not quantize_params.same_as(dequantize_params):
        return "the DQ and Q parameters differ: this pair requantizes"
    return None


def dequantize_of(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear (default domain) that produces ``value``, if any."""
    if value is None:
        return None
    producer = value.producer()
    return producer if is_op(producer, DEQUANTIZE) else None


def inputs_dequantized(node: ir.Node, count: int) -> bool:
    """Whether ``node`` has at least ``count`` inputs and each of its first ``count`` is produced by a DQ."""
    return len(node.inputs) >= count and all(dequantize_of(value) is not None for value in node.inputs[:count])


def dequantized_params(value: ir.Value) -> QuantParams | str:
    """Params of the DQ producing ``value``, or why there are none."""
    dequantize = dequantize_of(value)
    if dequantize is None:
        return f"input {value.name} is not produced by a DequantizeLinear"
    return read_params(dequantize)


def activation_input(value: ir.Value, *, dtype: ir.DataType = ir.DataType.UINT8) -> QuantParams | str:
    """Params of the per-tensor DQ producing an activation input of integer type ``dtype``, or a reason."""
    params = dequantized_params(value)
    if isinstance(params, str):
        return params
    return _per_tensor_refusal(params, dtype, f"input {value.name}", "takes") or params


def _per_tensor_refusal(params: QuantParams, dtype: ir.DataType, subject: str, verb: str) -> str | None:
    """Why a per-tensor ``dtype`` kernel cannot take (or write) ``subject`` quantized by ``params``, or None."""
    if params.integer_type != dtype:
        return f"{subject} is quantized to {params.integer_type}, the kernel {verb} {dtype}"
    if not params.per_tensor:
        return f"{subject} is quantized per channel, the kernel {verb} one scale"
    return None


@dataclasses.dataclass(frozen=True)
class OutputQuantize:
    """How an op's float output reaches its QuantizeLinear: directly, or through an implied Relu/Clip."""

    activation: ir.Node | None
    quantize: ir.Node
    params: QuantParams


def output_quantize(
    output: ir.Value,
    *,
    allow_activation: bool = True,
    dtype: ir.DataType = ir.DataType.UINT8,
) -> OutputQuantize | str | None:
    """The Q that quantizes ``output`` (possibly after a Relu/Clip), a reason it cannot be fused, or None when
    ``output`` is not quantized at all (read by something other than one Q)."""
    consumer = sole_consumer(output)
    if consumer is None:
        return None
    activation = None
    if allow_activation and is_op(consumer, "Relu", "Clip"):
        activation = consumer
        consumer = sole_consumer(activation.outputs[0])
        if consumer is None:
            return None
    if not is_op(consumer, QUANTIZE):
        return None
    params = read_params(consumer)
    if isinstance(params, str):
        return params
    reason = _per_tensor_refusal(params, dtype, "the output", "writes")
    if reason is None and activation is not None:
        reason = activation_implied(activation, params)
    return reason or OutputQuantize(activation, consumer, params)


def output_is_quantized_only(output: ir.Value) -> bool:
    """True when every reader of ``output`` is a QuantizeLinear (possibly through one Relu/Clip) and it is not a
    graph output: then the quantized-output lowering owns it, not the float-output one."""
    consumer = sole_consumer(output)
    if consumer is not None and is_op(consumer, "Relu", "Clip"):
        consumer = sole_consumer(consumer.outputs[0])
    return consumer is not None and is_op(consumer, QUANTIZE)


def _clip_bounds(node: ir.Node) -> tuple[float, float] | str:
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if "min" in node.attributes or "max" in node.attributes:  # Clip-6 attributes
        return float(attribute(node, "min", -np.inf)), float(attribute(node, "max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            bounds.append(float(default))
            continue
        array = constant_array(value)
        if array is None or array.size != 1:
            return f"the bounds of Clip {node.name} are not constant scalars"
        bounds.append(float(array.reshape(-1)[0]))
    return bounds[0], bounds[1]


def activation_implied(activation: ir.Node, params: QuantParams) -> str | None:
    """None when ``Q(activation(v)) == Q(v)`` for every v (see module docstring), else the reason it is not."""
    bounds = _clip_bounds(activation)
    if isinstance(bounds, str):
        return bounds
    low, high = bounds
    scale = params.scalar_scale()
    zero_point = params.scalar_zero_point()
    quantized_low = -np.inf if np.isneginf(low) else np.round(np.float32(low) / np.float32(scale)) + zero_point
    quantized_high = np.inf if np.isposinf(high) else np.round(np.float32(high) / np.float32(scale)) + zero_point
    if quantized_low > params.qmin:
        return (
            f"{activation.op_type} {activation.name} is not implied by the output range: its lower bound {low} "
            f"quantizes to {quantized_low:g} > qmin {params.qmin} (zero point {zero_point}, scale {scale:g})"
        )
    if quantized_high < params.qmax:
        return (
            f"{activation.op_type} {activation.name} is not implied by the output range: its upper bound {high} "
            f"quantizes to {quantized_high:g} < qmax {params.qmax} (zero point {zero_point}, scale {scale:g})"
        )
    return None


def reshape_per_channel(array: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A 1-D per-channel array shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = array.size
    return array.reshape(shape)


@dataclasses.dataclass(frozen=True)
class KernelWeight:
    """A constant weight ready for an integer kernel: its integer array and zero point array (same dtype)."""

    weight: np.ndarray
    zero_point: np.ndarray
    widened: bool  # int8 stored as uint8 (+128) to avoid u8·s8 saturation


def kernel_weight(params: QuantParams, *, guard_saturation: bool, force_uint8: bool = False) -> KernelWeight | str:
    """The weight of a DQ(constant int8/uint8) as the kernel will read it (see module docstring on saturation)."""
    weight = constant_array(params.integer_value)
    if weight is None:
        return f"the weight {params.integer_value.name} is not a constant initializer"
    zero_point = params.zero_point_array
    if weight.dtype == np.uint8:
        return KernelWeight(weight, zero_point.astype(np.uint8), False)
    if weight.dtype != np.int8:
        return f"the weight {params.integer_value.name} is {weight.dtype}, the kernels take int8 or uint8"
    too_wide = guard_saturation and int(np.abs(weight.astype(np.int16)).max(initial=0)) > SAFE_INT8_WEIGHT_MAGNITUDE
    if force_uint8 or too_wide:
        widened = (weight.astype(np.int16) + 128).astype(np.uint8)
        return KernelWeight(widened, (zero_point.astype(np.int16) + 128).astype(np.uint8), True)
    return KernelWeight(weight, zero_point.astype(np.int8), False)


# ---------------------------------------------------------------------------------------------------------------
# Rewriting helpers


def add_constant(
    graph: ir.Graph | ir.Function, names: NameScope, base_name: str, array: np.ndarray, *, before: ir.Node
) -> ir.Value:
    """A new constant under a fresh name: an initializer of ``graph``, or a Constant node before ``before`` inside a
    function (functions hold no initializers)."""
    if isinstance(graph, ir.Graph):
        return new_initializer(graph, names, base_name, array)
    name = names.fresh(base_name)
    array = np.asarray(array, order="C")  # (np.ascontiguousarray would turn a scalar into shape [1])
    tensor = ir.tensor(array, name=name)
    node = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], name=f"{name}_constant")
    node.outputs[0].name = name
    node.outputs[0].type = ir.TensorType(tensor.dtype)
    node.outputs[0].shape = ir.Shape(array.shape)
    node.outputs[0].const_value = tensor
    graph.insert_before(before, [node])
    return node.outputs[0]


def existing_or_new_constant(
    graph: ir.Graph | ir.Function,
    names: NameScope,
    value: ir.Value | None,
    array: np.ndarray,
    base_name: str,
    *,
    before: ir.Node,
) -> ir.Value:
    """``value`` when it already holds exactly ``array`` (same dtype and shape), else a new constant."""
    current = constant_array(value)
    if current is not None and current.dtype == array.dtype and current.shape == array.shape:
        if np.array_equal(current, array):
            return value
    return add_constant(graph, names, base_name, array, before=before)


def _drop_unused_constant(value: ir.Value | None) -> None:
    """Remove ``value`` when nothing reads it any more: an initializer, or the output of a Constant node."""
    if drop_unused_initializers([value]) or value is None or value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if is_op(producer, "Constant") and producer.graph is not None:
        producer.graph.remove(producer, safe=True)


def remove_if_unused(nodes: list[ir.Node | None]) -> None:
    """Remove each node (in order) whose outputs nobody reads, and the constants only they read."""
    for node in nodes:
        if node is None or node.graph is None:
            continue
        if any(output.uses() or output.is_graph_output() for output in node.outputs):
            continue
        inputs = list(node.inputs)
        node.graph.remove(node, safe=True)
        for value in inputs:
            _drop_unused_constant(value)


def int32_or_none(array: np.ndarray) -> np.ndarray | None:
    """``array`` rounded to int32, or None when a value does not fit (or is not finite)."""
    if not np.all(np.isfinite(array)):
        return None
    rounded = np.round(array)
    if rounded.min(initial=0) < -(2**31) or rounded.max(initial=0) > 2**31 - 1:
        return None
    return rounded.astype(np.int32)


def dequantized_constant(params: QuantParams) -> np.ndarray | None:
    """The float32 value of a DQ whose integer input is constant: ``(q - z) · s`` along its axis."""
    integer = constant_array(params.integer_value)
    if integer is None:
        return None
    scale = params.scale_array.astype(np.float64)
    zero_point = params.zero_point_array.astype(np.float64)
    if not params.per_tensor:
        axis = params.axis if params.axis >= 0 else params.axis + integer.ndim
        scale = reshape_per_channel(scale, axis, integer.ndim)
        zero_point = reshape_per_channel(zero_point, axis, integer.ndim)
    else:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return ((integer.astype(np.float64) - zero_point) * scale).astype(np.float32)


def describe_node(node: ir.Node) -> str:
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def constant_float(value: ir.Value) -> np.ndarray | str:
    """The float value of a constant input: a float initializer, or a DQ of a constant integer initializer."""
    dequantize = dequantize_of(value)
    if dequantize is not None:
        params = read_params(dequantize)
        if isinstance(params, str):
            return params
        array = dequantized_constant(params)
        if array is None:
            return f"the integer input of {describe_node(dequantize)} is not a constant initializer"
        return array
    array = constant_array(value)
    if array is None:
        return f"{value.name} is not a constant"
    if array.dtype != np.float32:
        return f"{value.name} is {array.dtype}, not float32"
    return array


def bias_as_int32(value: ir.Value, accumulator_scale: np.ndarray) -> tuple[np.ndarray, bool] | str:
    """The bias as int32 in the accumulator's scale (``s_x · s_w`` per output channel), and whether it is the
    stored ``bq`` unchanged (its DQ scale equals the accumulator scale and its zero point is 0). Otherwise the bias
    is requantized, ``round(b / (s_x · s_w))``: an error of at most half an accumulator step per channel, far below
    one output step."""
    dequantize = dequantize_of(value)
    if dequantize is not None:
        params = read_params(dequantize)
        if isinstance(params, str):
            return params
        stored = constant_array(params.integer_value)
        if (
            stored is not None
            and stored.dtype == np.int32
            and stored.ndim == 1
            and not np.any(params.zero_point_array)
            and np.allclose(np.broadcast_to(params.scale_array, stored.shape), accumulator_scale, rtol=1e-6, atol=0)
        ):
            return stored, True
    real = constant_float(value)
    if isinstance(real, str):
        return f"bias: {real}"
    if real.ndim != 1 or real.size != accumulator_scale.size:
        return f"the bias {value.name} has shape {real.shape}, not [{accumulator_scale.size}]"
    requantized = int32_or_none(real.astype(np.float64) / accumulator_scale.astype(np.float64))
    if requantized is None:
        return f"the bias {value.name} does not fit int32 in the accumulator scale"
    return requantized, False


def derived_name(node: ir.Node, suffix: str) -> str | None:
    """A name for the node that replaces ``node`` (None lets the graph name it)."""
    return f"{node.name}_{suffix}" if node.name else None


def zero_point_or_new(
    graph: ir.Graph | ir.Function, names: NameScope, params: QuantParams, *, before: ir.Node
) -> ir.Value:
    """The zero point input of ``params``, or a new constant zero of its integer type when the node omits it."""
    if params.zero_point is not None:
        return params.zero_point
    dtype = params.integer_type.numpy()
    return add_constant(graph, names, f"{params.node.name or 'q'}_zero_point",
                        np.zeros(params.scale_array.shape, dtype), before=before)


def scale_and_zero_point(
    graph: ir.Graph | ir.Function, names: NameScope, params: QuantParams, *, before: ir.Node
) -> list[ir.Value]:
    """The ``(scale, zero point)`` inputs a QLinear kernel reads for its output (a new zero constant if omitted)."""
    return [params.scale, zero_point_or_new(graph, names, params, before=before)]


def quantized_triple(
    graph: ir.Graph | ir.Function, names: NameScope, params: QuantParams, *, before: ir.Node
) -> list[ir.Value]:
    """The ``(integer tensor, scale, zero point)`` inputs a QLinear kernel reads for one quantized input."""
    return [params.integer_value, *scale_and_zero_point(graph, names, params, before=before)]


def replace_island(
    model: ir.Model,
    op: ir.Node,
    output: OutputQuantize,
    lowered: ir.Node,
    *,
    contrib: bool = False,
) -> None:
    """Insert ``lowered`` (which writes the Q output's integer tensor) before the Q, move the Q output's readers to
    it and remove the Q, the activation, ``op`` and the input DQs when nothing else reads them."""
    graph = op.graph
    if contrib:
        ensure_microsoft_domain(model, graph)
    graph.insert_before(output.quantize, [lowered])
    take_over(output.quantize.outputs[0], lowered.outputs[0])
    input_dequantizes = [dequantize_of(value) for value in op.inputs]
    remove_if_unused([output.quantize, output.activation, op, *input_dequantizes])
    logger.debug("lowered %s to %s", describe_node(op), describe_node(lowered))


def copy_attributes(node: ir.Node, *, drop: tuple[str, ...] = ()) -> list[ir.Attr]:
    return [attr for name, attr in node.attributes.items() if name not in drop]


@dataclasses.dataclass(frozen=True)
class MatMulOperand:
    """The right operand of a quantized MatMul: a constant weight (per tensor or per output column) prepared for
    the kernel, or a uint8 per-tensor activation."""

    params: QuantParams
    weight: KernelWeight | None  # None for an activation operand


def matmul_right_operand(value: ir.Value, *, guard_saturation: bool) -> MatMulOperand | str:
    params = dequantized_params(value)
    if isinstance(params, str):
        return params
    array = constant_array(params.integer_value)
    if array is None:
        if params.integer_type != ir.DataType.UINT8 or not params.per_tensor:
            return (
                f"the non-constant right operand {value.name} is {params.integer_type} "
                f"{'per tensor' if params.per_tensor else 'per channel'}; only uint8 per tensor is taken "
                "(int8 activations could saturate the AVX2 u8·s8 kernel, which cannot be checked at compile time)"
            )
        return MatMulOperand(params, None)
    if not params.per_tensor:
        if array.ndim != 2 or params.axis not in (1, -1):
            return (
                f"the weight {value.name} (rank {array.ndim}) is quantized per channel along axis {params.axis}; "
                "the integer MatMul kernels take one scale per output column of a 2-D weight only"
            )
    weight = kernel_weight(params, guard_saturation=guard_saturation)
    if isinstance(weight, str):
        return weight
    return MatMulOperand(params, weight)


def conv_weight(conv: ir.Node, kernel: str) -> tuple[QuantParams, np.ndarray] | str:
    """The params and stored integer array of a Conv's quantized weight, or why ``kernel`` cannot take it: the
    weight must be a constant, quantized per tensor or per output channel (axis 0), with one zero point."""
    params = dequantized_params(conv.inputs[1])
    if isinstance(params, str):
        return params
    array = constant_array(params.integer_value)
    if array is None:
        return "the weight is not a constant initializer"
    if not params.per_tensor and params.axis not in (0, -array.ndim):
        return f"the weight is quantized per channel along axis {params.axis}, not 0 ({kernel} needs axis 0)"
    if len(np.unique(params.zero_point_array)) != 1:
        return f"the weight zero points differ across channels; onnxruntime's {kernel} takes one zero point"
    return params, array


def conv_operands(conv: ir.Node, kernel: str) -> tuple[QuantParams, QuantParams, np.ndarray] | str:
    """The activation input's params, the weight's params and its stored integer array of a quantized Conv, or why
    ``kernel`` cannot take them (see :func:`activation_input` and :func:`conv_weight`)."""
    input_params = activation_input(conv.inputs[0])
    if isinstance(input_params, str):
        return input_params
    stored_weight = conv_weight(conv, kernel)
    if isinstance(stored_weight, str):
        return stored_weight
    return (input_params, *stored_weight)


def matmul_operands(matmul: ir.Node, *, guard_saturation: bool) -> tuple[QuantParams, MatMulOperand] | str:
    """The activation (left) and right operand of a quantized MatMul, or why the integer kernels cannot take them."""
    left = activation_input(matmul.inputs[0])
    if isinstance(left, str):
        return left
    right = matmul_right_operand(matmul.inputs[1], guard_saturation=guard_saturation)
    if isinstance(right, str):
        return right
    return left, right


def operand_values(
    graph: ir.Graph | ir.Function, names: NameScope, operand: MatMulOperand, *, before: ir.Node
) -> tuple[ir.Value, ir.Value]:
    """The integer tensor and zero point to feed a kernel for ``operand`` (new constants if widened)."""
    params = operand.params
    if operand.weight is None:
        return params.integer_value, zero_point_or_new(graph, names, params, before=before)
    value = params.integer_value
    if operand.weight.widened:
        value = add_constant(graph, names, f"{value.name}_uint8", operand.weight.weight, before=before)
    zero_point = existing_or_new_constant(
        graph, names, params.zero_point, operand.weight.zero_point.reshape(params.scale_array.shape),
        f"{value.name}_zero_point", before=before,
    )
    return value, zero_point


def replace_float_op(op: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Insert ``new_nodes`` before ``op``; the last one's output replaces ``op``'s float output, and ``op`` and its
    input DQs go away when nothing else reads them."""
    graph = op.graph
    graph.insert_before(op, new_nodes)
    take_over(op.outputs[0], new_nodes[-1].outputs[0])
    input_dequantizes = [dequantize_of(value) for value in op.inputs]
    remove_if_unused([op, *input_dequantizes])
    logger.debug("lowered %s to %s", describe_node(op), " → ".join(node.op_type for node in new_nodes))


def rescale_nodes(
    graph: ir.Graph | ir.Function,
    names: NameScope,
    accumulator: ir.Value,
    scale: np.ndarray,
    bias: np.ndarray | None,
    *,
    before: ir.Node,
    base_name: str,
) -> list[ir.Node]:
    """``Cast(accumulator, float) · scale [+ bias]``: an int32 accumulator back to the float it stands for."""
    cast = ir.Node("", "Cast", [accumulator], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{base_name}_cast")
    scale_value = add_constant(graph, names, f"{base_name}_scale", scale.astype(np.float32), before=before)
    multiply = ir.Node("", "Mul", [cast.outputs[0], scale_value], name=f"{base_name}_rescale")
    nodes = [cast, multiply]
    if bias is not None:
        bias_value = add_constant(graph, names, f"{base_name}_bias", bias.astype(np.float32), before=before)
        nodes.append(ir.Node("", "Add", [multiply.outputs[0], bias_value], name=f"{base_name}_bias_add"))
    return nodes

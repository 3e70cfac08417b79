"""The trainable fake-quantization graph built from a calibrated QDQ graph (docs/qdq-format.md).

Every quantizer of the QDQ graph becomes a differentiable composition of ONNX operators that computes *the same
forward values* as the QDQ pair it replaces, so the training graph in eval mode is the deployed integer model:

- **Activation** ``t → QuantizeLinear(s, z) → DequantizeLinear(s, z)`` (per tensor, zero point ``z`` fixed) becomes::

      S   = exp(k · L)                                          # learnable, L = log(s) / k at the start
      v   = t / S
      t̂   = S · (R(Clip(v, qmin − z − ½, qmax − z + ½)))          # R(x) = (x + 1.5 · 2²³) − 1.5 · 2²³
          = S · (clamp(round(t / S) + z, qmin, qmax) − z)

  The float32 addition of ``1.5 · 2²³`` rounds half to even, like QuantizeLinear, and the clip bounds are the
  float32 neighbours inside the cell, so the codes are QuantizeLinear's bit for bit (:meth:`_Builder.rounding_nodes`).
  The gradient is the straight-through estimator ``∂t̂/∂t = 1`` where the value was not clipped and ``0`` where it
  was (``Clip``'s gradient; ``Add``/``Sub`` pass it unchanged) — what ``com.microsoft::FakeQuant`` computes, whose
  kernel rounds element by element with ``std::nearbyint`` and costs several times these three vectorised kernels.
  Through the ``Div`` and the ``Mul`` the gradient that reaches ``S`` is LSQ's (Esser et al., 2020)::

      ∂t̂/∂S = (clamp(round(v) + z) − z) − v · 1[in range],   v = t / S
            = round(v) − v  inside the range,  qmin − z or qmax − z where clipped.

  A *learnable* activation scale over an 8-bit type's full range (not on a graph input or output) takes a faster
  form with the same values and gradients: ``com.microsoft::QuantizeLinear → DequantizeLinear`` computes ``t̂``
  and ``com.microsoft::PassThrough(t̂, t, S)`` carries the STE and LSQ gradients defined by
  :func:`qgraph.train.ort_training.register_gradient_overrides` — about half the kernels per step
  (:func:`_learnable_quantize_dequantize`).
- **Weight** ``DequantizeLinear(Wq, s_w, 0, axis=a)`` becomes a float trainable weight ``W`` read through the same
  composition with a per-channel ``S_w = exp(k · L_w)`` reshaped to broadcast along ``a`` (``[C, 1, 1, 1]`` for a
  Conv weight) and the weight spec's ``[qmin, qmax]`` (``[-127, 127]`` for int8 narrow range, ``[-7, 7]`` for
  ``--weight-bits 4``, ``[-63, 63]`` with reduce_range). ``W`` starts from the FP32 weight when the float model is
  given (the latent weight keeps its position between grid points, so small updates move it across a rounding
  boundary only when the gradient insists), otherwise from the dequantized ``Wq · s_w``; both give the same forward
  values at step 0.
- **Bias** ``DequantizeLinear(bq, s_x · s_w)`` becomes a float trainable bias (FP32 value, or the dequantized one).
  It is re-quantized to int32 at export; the int32 grid step ``s_x · s_w`` is far below any activation step, so the
  bias is not fake-quantized during training.

**Scale parametrisation.** ``S = exp(k · L)`` keeps every scale positive without clamping (a clamp would zero the
gradient at the bound), and makes an AdamW step on ``L`` — about ``lr`` in size — a *relative* change of about
``k · lr`` of the scale, whatever the scale's magnitude (weight scales of 1e-3 and activation scales of 1e-1 move at
the same relative pace). ``k`` is :attr:`QATOptions.scale_rate_multiplier` (10 by default). Scale groups of the plan
(Concat inputs, MaxPool/Reshape pass-through) share one ``L``, so they keep sharing a scale after training. With
``learn_scales=False`` the scales are constants in the same composition (no gradient reaches them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qgraph.errors import UnsupportedModelError
from qgraph.ir.naming import NameScope
from qgraph.ir.values import MICROSOFT_DOMAIN

logger = logging.getLogger(__name__)

# Adding then subtracting 1.5 · 2²³ rounds a float32 of magnitude below 2²² half to even to an integer.
_ROUNDING_SHIFT = 12582912.0
_INTEGER_WEIGHT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                         onnx.TensorProto.INT16, onnx.TensorProto.UINT16}


@dataclasses.dataclass(frozen=True)
class ActivationQuantizer:
    """One per-tensor activation scale (shared by a scale group) and the QDQ pairs that use it."""

    key: str
    tensors: tuple[str, ...]
    scale_initializers: tuple[str, ...]
    log_scale: str | None
    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
    """A float trainable weight ``name`` standing for the QDQ graph's ``quantized`` initializer."""

    name: str
    quantized: str
    scale_initializer: str
    axis: int | None
    log_scale: str | None
    scale: np.ndarray
    zero_point: int
    qmin: int
    qmax: int


@dataclasses.dataclass(frozen=True)
class BiasQuantizer:
    """A float trainable bias ``name`` standing for the int32 ``quantized`` initializer (scale ``s_x · s_w``)."""

    name: str
    quantized: str
    scale_initializer: str
    activation: str
    weight: str


@dataclasses.dataclass(frozen=True)
class FakeQuantGraph:
    """The training graph and what each of its parameters stands for in the QDQ graph it came from."""

    model: onnx.ModelProto
    qdq_model: onnx.ModelProto
    activations: tuple[ActivationQuantizer, ...]
    weights: tuple[WeightQuantizer, ...]
    biases: tuple[BiasQuantizer, ...]
    scale_rate_multiplier: float

    @property
    def activation_scale_parameters(self) -> tuple[str, ...]:
        return tuple(q.log_scale for q in self.activations if q.log_scale is not None)

    @property
    def weight_scale_parameters(self) -> tuple[str, ...]:
        return tuple(q.log_scale for q in self.weights if q.log_scale is not None)

    @property
    def trainable(self) -> tuple[str, ...]:
        return (tuple(q.name for q in self.weights) + tuple(q.name for q in self.biases)
                + self.weight_scale_parameters + self.activation_scale_parameters)

    def activation_of(self, tensor: str) -> ActivationQuantizer:
        for quantizer in self.activations:
            if tensor in quantizer.tensors:
                return quantizer
        raise KeyError(tensor)


class _Builder:
    """Accumulates the new nodes and initializers of the training graph."""

    def __init__(self, qdq_model: onnx.ModelProto, multiplier: float) -> None:
        self.multiplier = multiplier
        self.names = NameScope.of_proto(qdq_model)
        self.prologue: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple[str, float], str] = {}
        self.scaled_bounds: dict[tuple[str, str, float], str] = {}

    def initializer(self, name: str, array: np.ndarray) -> str:
        name = self.names.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def constant(self, value: float) -> str:
        """A float32 scalar from a Constant node (not an initializer, so it is neither trained nor frozen)."""
        key = ("float", float(value))
        if key not in self._constants:
            name = self.names.fresh(f"qat.constant.{value:g}")
            self.prologue.append(helper.make_node("Constant", [], [name], value_float=float(value), name=name))
            self._constants[key] = name
        return self._constants[key]

    def constant_array(self, prefix: str, array: np.ndarray) -> str:
        name = self.names.fresh(prefix)
        tensor = numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)
        self.prologue.append(helper.make_node("Constant", [], [name], value=tensor, name=name))
        return name

    def learnable_scale(self, prefix: str, scale: np.ndarray) -> tuple[str, str]:
        """(log-scale parameter, scale tensor) with ``scale = exp(k · L)``; nodes go to the prologue."""
        log_scale = (np.log(np.asarray(scale, dtype=np.float64)) / self.multiplier).astype(np.float32)
        parameter = self.initializer(f"{prefix}.qat_log_scale", log_scale)
        exponent = parameter
        if self.multiplier != 1.0:
            exponent = self.names.fresh(f"{prefix}.qat_scaled_log_scale")
            self.prologue.append(helper.make_node("Mul", [parameter, self.constant(self.multiplier)], [exponent],
                                                  name=exponent))
        output = self.names.fresh(f"{prefix}.qat_scale")
        self.prologue.append(helper.make_node("Exp", [exponent], [output], name=output))
        return parameter, output

    def fake_quant(self, prefix: str, source: str, scale: str, zero_point: int, qmin: int, qmax: int,
                   output: str) -> list[onnx.NodeProto]:
        """``output = scale · (clamp(round(source / scale) + z, qmin, qmax) − z)``: STE to ``source``, LSQ to
        ``scale`` (see :func:`rounding_nodes` for the rounding)."""
        divided = self.names.fresh(f"{prefix}.qat_divided")
        codes = self.names.fresh(f"{prefix}.qat_codes")
        return [
            helper.make_node("Div", [source, scale], [divided], name=divided),
            *self.rounding_nodes(prefix, divided, zero_point, qmin, qmax, codes),
            helper.make_node("Mul", [codes, scale], [output], name=output),
        ]

    def rounding_nodes(self, prefix: str, source: str, zero_point: int, qmin: int, qmax: int,
                       output: str) -> list[onnx.NodeProto]:
        """``output = clamp(round_half_even(source) + z, qmin, qmax) − z`` with a straight-through gradient.

        ``Clip`` to the half-open cell ``(qmin − z − ½, qmax − z + ½)`` — its bounds are the float32 neighbours
        inside, so a clipped value rounds to the end code and never to the tie beyond it — then the rounding
        ``(v + 1.5 · 2²³) − 1.5 · 2²³``: float32 addition rounds half to even to the 1-ulp grid of that magnitude,
        exactly like ``QuantizeLinear`` and ``com.microsoft::FakeQuant``. Its gradient is ``Clip``'s in-range mask
        and 1 through ``Add``/``Sub`` — the STE of FakeQuant, whose own kernel rounds element by element with
        ``std::nearbyint`` and costs several times these three vectorised kernels.
        """
        lower = np.nextafter(np.float32(qmin - zero_point - 0.5), np.float32(np.inf))
        upper = np.nextafter(np.float32(qmax - zero_point + 0.5), np.float32(-np.inf))
        clipped = self.names.fresh(f"{prefix}.qat_clipped")
        shifted = self.names.fresh(f"{prefix}.qat_shifted")
        return [
            helper.make_node("Clip", [source, self.constant(lower), self.constant(upper)], [clipped], name=clipped),
            helper.make_node("Add", [clipped, self.constant(_ROUNDING_SHIFT)], [shifted], name=shifted),
            helper.make_node("Sub", [shifted, self.constant(_ROUNDING_SHIFT)], [output], name=output),
        ]


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def _uniform_zero_point(array: np.ndarray, what: str) -> int:
    values = np.unique(np.asarray(array).astype(np.int64))
    if values.size != 1:
        raise UnsupportedModelError(f"{what} has per-channel zero points {values[:4]}...; QAT needs one zero point")
    return int(values[0])


def _broadcast_shape(rank: int, axis: int, channels: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis % rank] = channels
    return np.asarray(shape, dtype=np.int64)


def build_fake_quant_graph(
    qdq_model: onnx.ModelProto,
    plan,
    parameters: Mapping[str, object],
    *,
    float_model: onnx.ModelProto | None = None,
    learn_scales: bool = True,
    learn_activation_scales: bool | None = None,
    scale_rate_multiplier: float = 10.0,
) -> FakeQuantGraph:
    """The trainable graph for ``qdq_model`` (the QDQ graph ``quantize(lower=False)`` wrote for ``plan``).

    ``parameters`` are the calibrated :class:`~qgraph.quant.spec.QuantParams` by tensor name (they give the weight
    specs, whose ``[qmin, qmax]`` the int8 storage of a 4-bit weight cannot tell); ``float_model`` (the canonical FP32
    model) supplies the starting values of weights and biases. ``learn_activation_scales`` (default:
    ``learn_scales``) can keep the activation scales fixed while the weight scales learn. Learnable activation
    scales must be among the trained parameters: the gradient of the fast quantizer
    (:func:`_learnable_quantize_dequantize`) cannot be built for a scale that gets none — onnxruntime-training 1.19
    fails on a custom gradient whose scale output is not required; keep such scales fixed here instead.
    """
    if learn_activation_scales is None:
        learn_activation_scales = learn_scales
    graph = qdq_model.graph
    initializers = _initializers(qdq_model)
    float_initializers = _initializers(float_model) if float_model is not None else {}
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes_by_name = {node.name: node for node in graph.node if node.name}
    builder = _Builder(qdq_model, float(scale_rate_multiplier))

    # Which plan weight / bias each DequantizeLinear of a constant stands for (by consumer and position).
    weight_names: dict[str, str] = {}
    bias_names: dict[str, str] = {}
    for weight in plan.weights:
        consumer = nodes_by_name.get(weight.consumer)
        if consumer is None:
            continue
        for name in consumer.input:
            producer = producers.get(name)
            if (producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in initializers
                    and initializers[producer.input[0]].data_type in _INTEGER_WEIGHT_TYPES):
                weight_names.setdefault(producer.name or producer.output[0], weight.name)
    for bias in plan.biases:
        consumer = nodes_by_name.get(bias.consumer)
        if consumer is not None and len(consumer.input) > 2 and consumer.input[2] in producers:
            bias_names[producers[consumer.input[2]].output[0]] = bias.name

    # Activation scale groups: one learnable scale per group of the plan.
    activation_pairs: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    group_members: dict[str, list[tuple[str, str]]] = {}
    group_parameters: dict[str, tuple[float, int, int, int]] = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        readers = consumers.get(node.output[0], [])
        if not readers or any(reader.op_type != "DequantizeLinear" for reader in readers):
            raise UnsupportedModelError(f"QuantizeLinear {node.name!r} is not followed by DequantizeLinear only; "
                                        "QAT needs the QDQ form of docs/qdq-format.md")
        tensor = node.input[0]
        scale = float(numpy_helper.to_array(initializers[node.input[1]]).reshape(()))
        zero_point = _uniform_zero_point(numpy_helper.to_array(initializers[node.input[2]]), f"activation {tensor!r}")
        spec = plan.activation_spec_of(tensor)
        key = sorted(plan.group_of(tensor))[0]
        group_members.setdefault(key, []).append((tensor, node.input[1]))
        group_parameters.setdefault(key, (scale, zero_point, spec.qmin, spec.qmax))
        activation_pairs.append((node, readers))

    activation_scale_tensor: dict[str, str] = {}
    activations: list[ActivationQuantizer] = []
    for key, members in group_members.items():
        scale, zero_point, qmin, qmax = group_parameters[key]
        log_scale = None
        if learn_activation_scales:
            log_scale, activation_scale_tensor[key] = builder.learnable_scale(key, np.asarray(scale, np.float32))
        activations.append(ActivationQuantizer(
            key=key, tensors=tuple(tensor for tensor, _ in members),
            scale_initializers=tuple(dict.fromkeys(name for _, name in members)), log_scale=log_scale, scale=scale,
            zero_point=zero_point, qmin=qmin, qmax=qmax,
        ))
    key_of = {tensor: quantizer.key for quantizer in activations for tensor in quantizer.tensors}
    by_key = {quantizer.key: quantizer for quantizer in activations}

    renamed: dict[str, str] = {}
    body: list[onnx.NodeProto] = []
    weights: list[WeightQuantizer] = []
    biases: list[BiasQuantizer] = []
    pending_biases: list[tuple[onnx.NodeProto, str]] = []
    handled = {id(reader) for _, readers in activation_pairs for reader in readers}
    pair_of = {id(quantize): readers for quantize, readers in activation_pairs}
    skipped = 0
    boundary = {value.name for value in graph.input} | {value.name for value in graph.output}
    for node in graph.node:
        if id(node) in handled:
            continue
        if node.op_type == "QuantizeLinear":
            readers = pair_of[id(node)]
            if _on_the_grid_already(node, producers, initializers, key_of):
                body.extend(helper.make_node("Identity", [node.input[0]], [reader.output[0]], name=reader.output[0])
                            for reader in readers)
                skipped += 1
                continue
            body.extend(_activation_nodes(builder, node, readers, by_key[key_of[node.input[0]]],
                                          activation_scale_tensor.get(key_of[node.input[0]]),
                                          initializers[node.input[2]].data_type, boundary))
            continue
        if (node.op_type == "DequantizeLinear" and node.input[0] in initializers):
            stored = initializers[node.input[0]]
            if stored.data_type == onnx.TensorProto.INT32:
                pending_biases.append((node, bias_names.get(node.output[0], node.input[0].removesuffix("_quantized"))))
                continue
            if stored.data_type in _INTEGER_WEIGHT_TYPES:
                plan_name = weight_names.get(node.name or node.output[0])
                if plan_name is None or plan_name not in parameters:
                    raise UnsupportedModelError(
                        f"weight DequantizeLinear {node.name!r} is not in the quantization plan"
                    )
                quantizer, new_nodes = _weight_nodes(builder, node, initializers, float_initializers, plan_name,
                                                     parameters[plan_name], learn_scales)
                weights.append(quantizer)
                body.extend(new_nodes)
                continue
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        body.append(copied)

    weight_by_output = {}
    for quantizer in weights:
        weight_by_output[quantizer.quantized] = quantizer
    for node, plan_name in pending_biases:
        consumer = next(iter(consumers.get(node.output[0], [])), None)
        if consumer is None or len(consumer.input) < 3:
            raise UnsupportedModelError(f"bias DequantizeLinear {node.name!r} has no Conv/Gemm consumer")
        activation_tensor = _dequantized_source(consumer.input[0], producers)
        weight_source = producers.get(consumer.input[1])
        weight = next((q for q in weights if weight_source is not None and q.quantized == weight_source.input[0]),
                      None)
        if activation_tensor not in key_of or weight is None:
            raise UnsupportedModelError(f"bias {plan_name!r}: its activation or weight is not quantized")
        reference = float_initializers.get(plan_name)
        stored = initializers[node.input[0]]
        dequantized = (numpy_helper.to_array(stored).astype(np.float64)
                       * numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64))
        value = numpy_helper.to_array(reference).astype(np.float32) if reference is not None else dequantized
        if value.shape != dequantized.shape:
            value = dequantized.astype(np.float32)
        name = builder.initializer(plan_name, value.astype(np.float32))
        renamed[node.output[0]] = name
        biases.append(BiasQuantizer(name=name, quantized=node.input[0], scale_initializer=node.input[1],
                                    activation=activation_tensor, weight=weight.name))

    for node in body:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]

    model = _assemble(qdq_model, builder, body)
    logger.info("fake-quant graph: %d activation scales (%d tensors, %d already on their grid), %d weights, "
                "%d biases, scales %s", len(activations), sum(len(q.tensors) for q in activations), skipped,
                len(weights), len(biases), "learnable" if learn_scales else "fixed")
    return FakeQuantGraph(model=model, qdq_model=qdq_model, activations=tuple(activations), weights=tuple(weights),
                          biases=tuple(biases), scale_rate_multiplier=float(scale_rate_multiplier))


# Operators whose every output element is a copy of an element of their data input (input 0).
_VALUE_PRESERVING = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool",
                               "Slice", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"})


def _on_the_grid_already(quantize: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                         initializers: Mapping[str, onnx.TensorProto], key_of: Mapping[str, str]) -> bool:
    """Whether the tensor ``quantize`` reads only moves values of an earlier Q/DQ pair of the same scale group.

    Such a quantizer — a Transpose or Reshape between two quantized MatMuls, the MaxPool or Flatten after a
    quantized Conv — sees values already on its grid: ``round(S·c / S) = c`` in float32 for every code ``c``, and
    nothing is clipped, so it is the identity in the forward pass, passes the whole gradient (STE mask 1) and adds
    ``round(v) − v ≈ 0`` to the scale's. The training graph reads the tensor directly instead; the Q/DQ pair stays
    in the exported QDQ graph with the group's learned scale.
    """
    tensor = quantize.input[0]
    producer = producers.get(tensor)
    if producer is None or producer.op_type not in _VALUE_PRESERVING:
        return False
    while producer is not None and producer.op_type in _VALUE_PRESERVING and producer.input:
        producer = producers.get(producer.input[0])
    if producer is None or producer.op_type != "DequantizeLinear":
        return False
    source = producers.get(producer.input[0])
    if source is None or source.op_type != "QuantizeLinear" or key_of.get(source.input[0]) != key_of.get(tensor):
        return False
    # Same scale parameter during training; the grids must also agree where the QDQ graph starts.
    same = [numpy_helper.to_array(initializers[a]).tolist() == numpy_helper.to_array(initializers[b]).tolist()
            for a, b in ((source.input[1], quantize.input[1]), (source.input[2], quantize.input[2]))]
    return all(same) and numpy_helper.to_array(initializers[source.input[2]]).dtype == numpy_helper.to_array(
        initializers[quantize.input[2]]).dtype


def _dequantized_source(name: str, producers: Mapping[str, onnx.NodeProto]) -> str | None:
    """The float tensor whose Q/DQ pair produced ``name`` (``None`` when ``name`` is not a DQ output)."""
    dequantize = producers.get(name)
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    quantize = producers.get(dequantize.input[0])
    return quantize.input[0] if quantize is not None and quantize.op_type == "QuantizeLinear" else None


_FULL_RANGES = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255)}
# Learnable 8-bit activation quantizers as QuantizeLinear → DequantizeLinear → PassThrough (tests switch it off to
# compare with the differentiable composition).
_PASS_THROUGH_ACTIVATIONS = True


def _activation_nodes(builder: _Builder, quantize: onnx.NodeProto, readers: list[onnx.NodeProto],
                      quantizer: ActivationQuantizer, scale_tensor: str | None, zero_point_type: int,
                      boundary: set[str]) -> list[onnx.NodeProto]:
    tensor = quantize.input[0]
    output = readers[0].output[0]
    full_range = _FULL_RANGES.get(zero_point_type) == (quantizer.qmin, quantizer.qmax)
    at_boundary = tensor in boundary or any(reader.output[0] in boundary for reader in readers)
    if _PASS_THROUGH_ACTIVATIONS and scale_tensor is not None and full_range and not at_boundary:
        nodes = _learnable_quantize_dequantize(builder, quantize, scale_tensor, quantizer, output)
    else:
        if scale_tensor is None:
            scale_tensor = builder.constant(quantizer.scale)
        nodes = builder.fake_quant(tensor, tensor, scale_tensor, quantizer.zero_point, quantizer.qmin,
                                   quantizer.qmax, output)
    for reader in readers[1:]:
        nodes.append(helper.make_node("Identity", [output], [reader.output[0]], name=reader.output[0]))
    return nodes


def _learnable_quantize_dequantize(builder: _Builder, quantize: onnx.NodeProto, scale_tensor: str,
                                   quantizer: ActivationQuantizer, output: str) -> list[onnx.NodeProto]:
    """``QuantizeLinear → DequantizeLinear`` itself, with a learnable scale: the fast form of an activation quantizer.

    ``com.microsoft::QuantizeLinear``/``DequantizeLinear`` (MLAS kernels, the deployed arithmetic bit for bit; the
    ``com.microsoft`` domain keeps onnxruntime-training's QDQ fusion from turning the pair into the slow
    ``FakeQuant``) compute the values, and ``com.microsoft::PassThrough(t̂, t, S, low, high)`` hands them on
    unchanged while giving the gradient something to hold on to: :func:`qgraph.train.ort_training.
    register_gradient_overrides` defines PassThrough's gradient as the STE to ``t`` (in range: ``low ≤ t ≤ high``,
    the quantization cell's ends ``S · (qmin − z − ½)`` and ``S · (qmax − z + ½)``) and LSQ's to ``S``, from these
    inputs alone, in about half the kernels the differentiable composition needs. Only for 8-bit activations whose
    range is their type's (QuantizeLinear saturates there) that are neither a graph input nor a graph output
    (PassThrough's outputs alias its inputs' buffers, which onnxruntime cannot do for those).
    """
    tensor, _, zero_point = quantize.input[:3]
    bounds = []
    for end, code in (("low", quantizer.qmin - quantizer.zero_point - 0.5),
                      ("high", quantizer.qmax - quantizer.zero_point + 0.5)):
        key = (scale_tensor, end, code)
        if key not in builder.scaled_bounds:
            name = builder.names.fresh(f"{scale_tensor}.qat_{end}")
            builder.prologue.append(helper.make_node("Mul", [scale_tensor, builder.constant(code)], [name], name=name))
            builder.scaled_bounds[key] = name
        bounds.append(builder.scaled_bounds[key])
    codes = builder.names.fresh(f"{tensor}.qat_codes")
    dequantized = builder.names.fresh(f"{tensor}.qat_dequantized")
    inputs = [dequantized, tensor, scale_tensor, *bounds]
    return [
        helper.make_node("QuantizeLinear", [tensor, scale_tensor, zero_point], [codes], domain=MICROSOFT_DOMAIN,
                         name=codes),
        helper.make_node("DequantizeLinear", [codes, scale_tensor, zero_point], [dequantized],
                         domain=MICROSOFT_DOMAIN, name=dequantized),
        helper.make_node("PassThrough", inputs,
                         [output] + [builder.names.fresh(f"{name}.qat_pass") for name in inputs[1:]],
                         domain=MICROSOFT_DOMAIN, name=builder.names.fresh(f"{tensor}.qat_pass_through")),
    ]


def _weight_nodes(builder: _Builder, dequantize: onnx.NodeProto, initializers, float_initializers, plan_name: str,
                  params, learn_scales: bool) -> tuple[WeightQuantizer, list[onnx.NodeProto]]:
    stored = numpy_helper.to_array(initializers[dequantize.input[0]])
    scale = numpy_helper.to_array(initializers[dequantize.input[1]]).astype(np.float32)
    zero_point = _uniform_zero_point(numpy_helper.to_array(initializers[dequantize.input[2]]), f"weight {plan_name!r}")
    axis = None
    if scale.ndim == 1 and scale.size > 1:
        axis = next((attribute.i for attribute in dequantize.attribute if attribute.name == "axis"), 1)
    spec = params.spec
    shape = _broadcast_shape(stored.ndim, axis, scale.size) if axis is not None else None
    dequantized = (stored.astype(np.float32) - np.float32(zero_point)) * (
        scale.reshape(shape) if shape is not None else scale.reshape(()))
    reference = float_initializers.get(plan_name)
    value = numpy_helper.to_array(reference).astype(np.float32) if reference is not None else dequantized
    if value.shape != dequantized.shape:
        value = dequantized
    name = builder.initializer(plan_name, value.astype(np.float32))
    output = dequantize.output[0]
    nodes: list[onnx.NodeProto] = []
    log_scale = None
    if learn_scales:
        log_scale, scale_tensor = builder.learnable_scale(plan_name, scale.reshape(-1) if axis is not None
                                                          else scale.reshape(()))
    else:
        scale_tensor = builder.constant_array(f"{plan_name}.qat_scale", scale.reshape(-1) if axis is not None
                                              else scale.reshape(()))
    if shape is not None:
        shape_name = builder.initializer(f"{plan_name}.qat_scale_shape", shape)
        broadcast = builder.names.fresh(f"{plan_name}.qat_scale_broadcast")
        nodes.append(helper.make_node("Reshape", [scale_tensor, shape_name], [broadcast], name=broadcast))
        scale_tensor = broadcast
    nodes.extend(builder.fake_quant(plan_name, name, scale_tensor, zero_point, spec.qmin, spec.qmax, output))
    quantizer = WeightQuantizer(
        name=name, quantized=dequantize.input[0], scale_initializer=dequantize.input[1], axis=axis,
        log_scale=log_scale, scale=scale, zero_point=zero_point, qmin=spec.qmin, qmax=spec.qmax,
    )
    return quantizer, nodes


def _assemble(qdq_model: onnx.ModelProto, builder: _Builder, body: list[onnx.NodeProto]) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    graph = model.graph
    used = {name for node in builder.prologue + body for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for t in builder.initializers if t.name in used])
    del graph.node[:]
    graph.node.extend(builder.prologue + body)
    produced = {name for node in graph.node for name in node.output}
    value_infos = [value for value in graph.value_info if value.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(value_infos)
    if not any(opset.domain == MICROSOFT_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT_DOMAIN, 1))
    return model


def scale_values(log_scales: Mapping[str, np.ndarray], multiplier: float) -> dict[str, np.ndarray]:
    """``exp(k · L)`` for each log-scale parameter, computed by onnxruntime like the training graph computes it."""
    import onnxruntime

    if not log_scales:
        return {}
    nodes = [helper.make_node("Mul", ["log_scale", "multiplier"], ["scaled"]),
             helper.make_node("Exp", ["scaled"], ["scale"])]
    if multiplier == 1.0:
        nodes = [helper.make_node("Exp", ["log_scale"], ["scale"])]
    graph = helper.make_graph(
        nodes, "scales", [helper.make_tensor_value_info("log_scale", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(multiplier, np.float32), "multiplier")] if multiplier != 1.0 else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = {}
    for name, array in log_scales.items():
        scale = session.run(None, {"log_scale": np.asarray(array, np.float32)})[0]
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise UnsupportedModelError(f"learned scale {name!r} is not finite and positive")
        values[name] = np.maximum(scale, np.float32(2.0**-32)).astype(np.float32)
    return values


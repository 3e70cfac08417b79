"""CorrectBias: fold the expected output shift that weight quantization causes into each layer's bias.

For a layer ``y = W ∗ x + b`` (Conv, or Gemm ``α·x·B + β·C``) whose weight is quantized to ``Ŵ = DQ(Q(W))``, the
integer layer computes ``Ŵ ∗ x + b``; its error ``(Ŵ − W) ∗ x`` has, per output channel c, the expectation

    shift_c = E[(Ŵ ∗ x)_c − (W ∗ x)_c] = E[(ΔW ∗ x)_c],      ΔW = Ŵ − W

(empirical bias correction, Nagel et al., "Data-Free Quantization", 2019, §4.2, with the expectation taken over the
calibration data rather than derived from BatchNorm statistics). Rounding errors do not average out per channel:
ΔW is fixed, so a channel whose weights happen to round up more than down is shifted by ``Σ ΔW · E[x]`` on every
input, which for ReLU inputs (E[x] > 0) is a systematic offset. Subtracting it from the bias, ``b' = b − shift``
(Gemm: ``C' = C − shift / β``), removes the offset; the noise around it stays.

For a Gemm, and a Conv without padding, ``shift_c = Σ_{i,k} ΔW[c, i, k] · μ_i`` with μ the per-channel mean of the
input observed during calibration. With zero padding the border positions see fewer real inputs than μ assumes, so
instead of that formula the pass computes ``E[(ΔW ∗ x)_c]`` exactly: it runs, on the calibration batches, the same
operator (same strides, pads, dilations, groups, transposes) with ``ΔW`` as its weight and no bias, on the layer's
input, and averages its output over every axis except the channel — by linearity the same number where the formula
holds. The input is the one the integer layer will see: the layer's input in the QDQ graph of the same plan (its
upstream layers quantized; ``quantized_inputs=False`` takes the float model's instead).

Measured (minmax, per-channel int8 and int4 weights, qgraph.models' trained MobileNetV2-small on Fashion-MNIST,
256 calibration / 244 test images): 31.94 → 31.61 dB at 8 bits and 12.49 → 10.60 dB at 4 bits — the correction
removes each layer's own mean shift (exactly: the tests check the per-channel means) but on this network the
shifts are small and partly cancel what follows, so applying it blindly costs SQNR. On a 4-bit per-tensor layer
after a ReLU it raises the SQNR (tests). Hence the caller measures before using it.

The pass changes biases only: the quantization plan and parameters stay as they are (the int32 bias is computed
from the corrected float bias by InsertQuantizeDequantize, which runs after it). Layers without a planned bias, a
weight or bias that is not a constant, a Gemm with β = 0, and ops other than Conv/Gemm are left as they are. Whether
the correction is used is decided by its caller on measured output error (see ``QuantizeOptions.bias_correction``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx_ir.passes import PassResult

from qgraph import runtime
from qgraph.ir.values import constant_array, default_opset
from qgraph.passes.infrastructure import Phase, QGraphPass, register
from qgraph.passes.quantize.insert_quantize_dequantize import InsertQuantizeDequantize
from qgraph.quant.numerics import fake_quantize

logger = logging.getLogger(__name__)

_OPERATORS = ("Conv", "Gemm")
#: The first default-domain opset in which ReduceMean takes its axes as an input.
_AXES_INPUT_OPSET = 18


def bias_shifts(
    model: ir.Model, plan, parameters: Mapping[str, object], batches: Iterable[Mapping[str, np.ndarray]],
    *, host: ir.Model | None = None,
) -> dict[str, np.ndarray]:
    """Bias name → ``E[(Ŵ − W) ∗ x]`` per output channel, measured on ``batches``: x is each layer's input in
    ``host`` (a model with the same node names, e.g. the QDQ graph), or in ``model`` itself."""
    nodes = {node.name: node for node in model.graph}
    probes: list[tuple[str, ir.Node, np.ndarray]] = []
    for bias in plan.biases:
        node = nodes.get(bias.consumer)
        if node is None or node.op_type not in _OPERATORS or node.domain not in ("", "ai.onnx"):
            continue
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        bias_array = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
        weight_params = parameters.get(node.inputs[1].name) if weight is not None else None
        if weight is None or bias_array is None or weight_params is None or node.inputs[2].name != bias.name:
            continue
        if node.op_type == "Gemm" and _float_attribute(node, "beta", 1.0) == 0.0:
            continue
        delta = fake_quantize(weight, weight_params).astype(np.float32) - weight.astype(np.float32)
        if not np.any(delta):
            continue
        probes.append((bias.name, node, delta))
    if not probes:
        return {}
    proto = _probe_model(host if host is not None else model, probes)
    session = runtime.create_session(proto)
    names = [f"{name}__shift" for name, _, _ in probes]
    inputs = {model_input.name for model_input in session.get_inputs()}
    totals = [np.zeros(0)] * len(probes)
    weight_total = 0.0
    for batch in batches:
        feeds = {name: array for name, array in batch.items() if name in inputs}
        rows = float(next(iter(feeds.values())).shape[0]) if feeds else 1.0
        outputs = session.run(names, feeds)
        totals = [total + rows * output.astype(np.float64) if total.size else rows * output.astype(np.float64)
                  for total, output in zip(totals, outputs)]
        weight_total += rows
    if weight_total == 0.0:
        return {}
    return {name: (total / weight_total) for (name, _, _), total in zip(probes, totals)}


def _float_attribute(node: ir.Node, name: str, default: float) -> float:
    attribute = node.attributes.get(name)
    return attribute.as_float() if attribute is not None else default


def _probe_model(model: ir.Model, probes: list[tuple[str, ir.Node, np.ndarray]]) -> onnx.ModelProto:
    """The float model plus, for each probe, ``ReduceMean(op(x, ΔW))`` over every axis but the channel."""
    proto = ir.serde.serialize_model(model)
    opset = default_opset(model)
    graph = proto.graph
    host_nodes = {node.name: node for node in model.graph}
    for bias_name, node, delta in probes:
        node = host_nodes.get(node.name, node)
        stem = f"{bias_name}__shift"
        graph.initializer.append(numpy_helper.from_array(delta, f"{stem}_delta"))
        attributes = {name: ir.serde.serialize_attribute(attribute) for name, attribute in node.attributes.items()}
        product = helper.make_node(node.op_type, [node.inputs[0].name, f"{stem}_delta"], [f"{stem}_product"],
                                   name=f"{stem}_product")
        product.attribute.extend(attribute for name, attribute in attributes.items() if name != "beta")
        rank = len(delta.shape) if node.op_type == "Conv" else 2
        axes = [0, *range(2, rank)] if node.op_type == "Conv" else [0]
        if opset >= _AXES_INPUT_OPSET:
            graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{stem}_axes"))
            mean = helper.make_node("ReduceMean", [f"{stem}_product", f"{stem}_axes"], [stem], keepdims=0)
        else:
            mean = helper.make_node("ReduceMean", [f"{stem}_product"], [stem], axes=axes, keepdims=0)
        graph.node.extend([product, mean])
        graph.output.append(helper.make_tensor_value_info(stem, onnx.TensorProto.FLOAT, None))
    return proto


@register
class CorrectBias(QGraphPass):
    """Subtract the expected output shift of weight quantization, measured on calibration data, from each bias."""

    phase = Phase.QUANTIZE
    summary = "Fold E[(W_q - W) x] per output channel into the bias (empirical bias correction)"

    def __init__(self, *, plan, parameters: Mapping[str, object], batches: Iterable[Mapping[str, np.ndarray]],
                 quantized_inputs: bool = True) -> None:
        super().__init__()
        self.quantized_inputs = quantized_inputs
        self.plan = plan
        self.parameters = parameters
        self.batches = batches

    def call(self, model: ir.Model) -> PassResult:
        host = None
        if self.quantized_inputs:
            host = ir.serde.deserialize_model(ir.serde.serialize_model(model))
            InsertQuantizeDequantize(plan=self.plan, parameters=self.parameters)(host)
        shifts = bias_shifts(model, self.plan, self.parameters, self.batches, host=host)
        nodes = {node.name: node for node in model.graph}
        consumers = {bias.name: nodes.get(bias.consumer) for bias in self.plan.biases}
        modified = False
        for name, shift in shifts.items():
            node = consumers[name]
            value = node.inputs[2]
            bias = constant_array(value).astype(np.float64)
            if node.op_type == "Gemm":
                shift = shift / _float_attribute(node, "beta", 1.0)
            corrected = (bias - shift.reshape(bias.shape) if bias.size == shift.size else bias - shift).astype(
                np.float32)
            value.const_value = ir.tensor(corrected, name=value.name)
            value.shape = ir.Shape(corrected.shape)
            modified = True
            logger.debug("corrected bias %s by up to %.3g", name, float(np.max(np.abs(shift))))
        if modified:
            logger.info("bias correction: %d biases corrected", len(shifts))
        return PassResult(model, modified)

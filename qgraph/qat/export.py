"""Export: the learned weights and scales written back into the clean QDQ graph, then the target's lowering.

The exported graph is the QDQ graph QAT started from (docs/qdq-format.md), node for node; only initializers change:

- activation scale ``s = exp(k · L)`` (computed by onnxruntime, bit for bit what the training graph computed) into
  the scale initializer of every Q/DQ pair of its scale group; zero points are unchanged;
- weight ``Wq = clamp(round_half_even(W / s_w) + z_w, qmin, qmax)`` (float32 division, like the training graph's
  ``Div``) and its per-channel ``s_w``;
- bias ``bq = round(b / (s_x · s_w))`` as int32 with scale ``s_x · s_w`` (products in float64, rounded to float32
  once, as :class:`~qgraph.passes.quantize.insert_quantize_dequantize.InsertQuantizeDequantize` does).

So the exported model computes exactly the training graph's eval-mode forward, except that the bias moves by at most
half an accumulator step ``s_x · s_w / 2`` — far below one step of any activation it feeds, though near a rounding
boundary of the next quantizer it can flip that code by one step. Lowering then runs as after PTQ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from qgraph.qat.fake_quant_graph import FakeQuantGraph, scale_values

logger = logging.getLogger(__name__)

_INT32_LIMIT = 2**31 - 1


def read_checkpoint_parameters(checkpoint: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values of ``names`` stored in an onnxruntime training checkpoint."""
    from qgraph.train.ort_training import captured_native_stderr, training_api

    api = training_api().api
    with captured_native_stderr():
        state = api.CheckpointState.load_checkpoint(os.fspath(checkpoint))
    return {name: np.array(state.parameters[name].data, dtype=np.float32) for name in names}


def learned_scales(graph: FakeQuantGraph, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scale of every activation group (by group key) and weight (by weight name) after training."""
    parameters = {name: values[name] for name in graph.activation_scale_parameters + graph.weight_scale_parameters}
    computed = scale_values(parameters, graph.scale_rate_multiplier)
    scales: dict[str, np.ndarray] = {}
    for quantizer in graph.activations:
        scales[quantizer.key] = (computed[quantizer.log_scale] if quantizer.log_scale is not None
                                 else np.asarray(quantizer.scale, np.float32)).reshape(())
    for weight in graph.weights:
        scales[weight.name] = (computed[weight.log_scale] if weight.log_scale is not None
                               else np.asarray(weight.scale, np.float32))
    return scales


def _replace(initializers: dict[str, onnx.TensorProto], name: str, array: np.ndarray) -> None:
    initializers[name].CopyFrom(numpy_helper.from_array(np.array(array, order="C"), name))


def export_qdq(graph: FakeQuantGraph, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The QDQ model with the trained ``values`` (parameter name → array) of ``graph``'s training graph."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.qdq_model)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    scales = learned_scales(graph, values)
    activation_scale: dict[str, np.ndarray] = {}
    for quantizer in graph.activations:
        scale = scales[quantizer.key].astype(np.float32)
        for name in quantizer.scale_initializers:
            _replace(initializers, name, scale.reshape(()))
        for tensor in quantizer.tensors:
            activation_scale[tensor] = scale
    for weight in graph.weights:
        scale = scales[weight.name].astype(np.float32)
        array = np.asarray(values[weight.name], np.float32)
        broadcast = scale.reshape(()) if weight.axis is None else scale.reshape(
            [scale.size if axis == weight.axis % array.ndim else 1 for axis in range(array.ndim)])
        with np.errstate(over="ignore", invalid="ignore"):
            codes = np.rint(np.divide(array, broadcast, dtype=np.float32)) + np.float32(weight.zero_point)
        codes = np.clip(np.nan_to_num(codes, nan=float(weight.zero_point)), weight.qmin, weight.qmax)
        storage = numpy_helper.to_array(initializers[weight.quantized]).dtype
        _replace(initializers, weight.quantized, codes.astype(storage))
        _replace(initializers, weight.scale_initializer, scale.reshape(numpy_helper.to_array(
            initializers[weight.scale_initializer]).shape))
    for bias in graph.biases:
        array = np.asarray(values[bias.name], np.float64)
        weight_scale = scales[bias.weight].astype(np.float64).reshape(-1)
        scale = (activation_scale[bias.activation].astype(np.float64).reshape(()) * weight_scale).reshape(-1)
        if scale.size == 1:
            scale = np.full(array.shape, scale[0])
        quantized = np.clip(np.rint(array / scale), -_INT32_LIMIT, _INT32_LIMIT).astype(np.int32)
        _replace(initializers, bias.quantized, quantized)
        _replace(initializers, bias.scale_initializer, scale.astype(np.float32))
    onnx.checker.check_model(model)
    logger.info("exported %d learned activation scales, %d weights and %d biases into the QDQ graph",
                len(graph.activations), len(graph.weights), len(graph.biases))
    return model


def lower_qdq(model: onnx.ModelProto, quantize_options) -> tuple[ir.Model, tuple]:
    """The target's lowering (:func:`qgraph.ptq.lower_to_target`) of a QDQ model, as after PTQ."""
    from qgraph.ptq import lower_to_target
    from qgraph.targets import get_target

    lowered = ir.serde.deserialize_model(model)
    return lowered, lower_to_target(lowered, get_target(quantize_options.target, quantize_options.target_options))

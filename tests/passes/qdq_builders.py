"""Hand-built QDQ models in the form of docs/qdq-format.md, for the LOWER pass tests.

Independent of ``qgraph.quant`` on purpose: weights are quantized here with numpy (int8 symmetric, per channel or
per tensor), biases to int32 in the scale ``s_x · s_w``, and activations get a uint8 (scale, zero point) from the
range they take on seeded calibration inputs — the builder runs the graph built so far through onnxruntime to get
that range, so every scale is realistic.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime

OPSET = 17


def quantize_weight(weight: np.ndarray, *, axis: int | None, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of a float weight: (Wq, scale), scale per channel along ``axis`` or scalar."""
    limit = 2 ** (bits - 1) - 1
    if axis is None:
        scale = np.array(max(float(np.abs(weight).max()), 1e-8) / limit, np.float32)
        quantized = np.clip(np.round(weight / scale), -limit, limit).astype(np.int8)
        return quantized, scale
    other_axes = tuple(index for index in range(weight.ndim) if index != axis)
    scale = (np.maximum(np.abs(weight).max(axis=other_axes), 1e-8) / limit).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(weight / scale.reshape(shape)), -limit, limit).astype(np.int8)
    return quantized, scale


class QDQBuilder:
    """Builds a QDQ graph step by step; ``quantize`` calibrates an activation on the graph built so far."""

    def __init__(self, *, seed: int = 0, calibration_batches: int = 4) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.calibration: list[dict[str, np.ndarray]] = []
        self.calibration_batches = calibration_batches
        self._names = itertools.count()
        self.scales: dict[str, tuple[float, int]] = {}
        self.opset = OPSET

    # -- naming and constants --
    def fresh(self, base: str) -> str:
        return f"{base}_{next(self._names)}"

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def add_input(self, name: str, shape: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        if not self.calibration:
            self.calibration = [{} for _ in range(self.calibration_batches)]
        for feeds in self.calibration:
            feeds[name] = self.rng.standard_normal(shape).astype(np.float32)
        return name

    def node(self, op_type: str, inputs: list[str], *, domain: str = "", outputs: int = 1, **attributes) -> str:
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.fresh(f"{op_type}_node"), domain=domain,
                                           **attributes))
        return names[0] if outputs == 1 else names

    # -- quantization --
    def observe(self, tensor: str) -> tuple[float, float]:
        model = self.model(outputs=[tensor], float_outputs=True)
        session = runtime.create_session(model)
        values = [runtime.run(session, feeds)[tensor] for feeds in self.calibration]
        return min(float(v.min()) for v in values), max(float(v.max()) for v in values)

    def quantize(self, tensor: str, *, scale: float | None = None, zero_point: int | None = None,
                 dtype=np.uint8) -> str:
        """Q → DQ after ``tensor`` (uint8 asymmetric from the observed range unless given); returns the DQ output."""
        if scale is None:
            low, high = self.observe(tensor)
            low, high = min(low, 0.0), max(high, 0.0)
            qmin, qmax = (0, 255) if dtype == np.uint8 else (-128, 127)
            scale = max(high - low, 1e-6) / (qmax - qmin)
            if zero_point is None:
                zero_point = int(np.clip(np.round(qmin - low / scale), qmin, qmax))
        zero_point = 0 if zero_point is None else zero_point
        scale_name = self.constant(f"{tensor}_scale", np.array(scale, np.float32))
        zero_name = self.constant(f"{tensor}_zero_point", np.array(zero_point, dtype))
        quantized = self.node("QuantizeLinear", [tensor, scale_name, zero_name])
        self.scales[tensor] = (float(np.float32(scale)), zero_point)
        dequantized = self.node("DequantizeLinear", [quantized, scale_name, zero_name])
        self.scales[dequantized] = (float(np.float32(scale)), zero_point)
        return dequantized

    def weight(self, weight: np.ndarray, *, axis: int | None = 0, bits: int = 8) -> tuple[str, np.ndarray]:
        """DQ(Wq) with int8 zero points; returns the DQ output and the weight scale."""
        quantized, scale = quantize_weight(weight, axis=axis, bits=bits)
        inputs = [self.constant("Wq", quantized), self.constant("w_scale", scale),
                  self.constant("w_zero_point", np.zeros(scale.shape, np.int8))]
        attributes = {"axis": axis} if axis is not None else {}
        return self.node("DequantizeLinear", inputs, **attributes), scale

    def bias(self, bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> str:
        accumulator_scale = (np.float32(input_scale) * weight_scale).astype(np.float32)
        accumulator_scale = np.broadcast_to(accumulator_scale, bias.shape).astype(np.float32)
        quantized = np.round(bias / accumulator_scale).astype(np.int32)
        inputs = [self.constant("bq", quantized), self.constant("b_scale", accumulator_scale),
                  self.constant("b_zero_point", np.zeros(bias.shape, np.int32))]
        return self.node("DequantizeLinear", inputs, axis=0)

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray | None = None, *, per_channel: bool = True,
             bits: int = 8, **attributes) -> str:
        weight_value, weight_scale = self.weight(weight, axis=0 if per_channel else None, bits=bits)
        inputs = [x, weight_value]
        if bias is not None:
            inputs.append(self.bias(bias, self.scales[x][0], weight_scale))
        return self.node("Conv", inputs, **attributes)

    # -- building --
    def output(self, tensor: str) -> str:
        self.outputs.append(tensor)
        return tensor

    def model(self, *, outputs: list[str] | None = None, float_outputs: bool = True) -> onnx.ModelProto:
        outputs = outputs if outputs is not None else self.outputs
        graph = helper.make_graph(
            list(self.nodes), "qdq", list(self.inputs),
            [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in outputs],
            list(self.initializers),
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=10)
        model = onnx.shape_inference.infer_shapes(model)
        inferred = {info.name: info for info in model.graph.value_info}
        for output in model.graph.output:
            if output.name in inferred:
                output.type.CopyFrom(inferred[output.name].type)
        return model


def count_ops(model: onnx.ModelProto | ir.Model) -> dict[str, int]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def run_both(original: onnx.ModelProto, lowered: onnx.ModelProto | ir.Model, *, seed: int = 1):
    """Outputs of the QDQ model and of the lowered model on the same seeded inputs (graph optimisation off)."""
    lowered_proto = ir.serde.serialize_model(lowered) if isinstance(lowered, ir.Model) else lowered
    session = runtime.create_session(original)
    feeds = runtime.random_inputs(session, seed=seed)
    return runtime.run(session, feeds), runtime.run(runtime.create_session(lowered_proto), feeds)


def dequantize(array: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if array.dtype in (np.uint8, np.int8):
        return (array.astype(np.float64) - zero_point) * scale
    return array.astype(np.float64)


def lower_and_check(model: onnx.ModelProto, pass_instance, *, expect_modified: bool = True, steps: float = 1.0,
                    output_scales: dict[str, tuple[float, int]] | None = None, seed: int = 1,
                    float_atol: float = 1e-5):
    """Run a LOWER pass the way the design notes ask, with the tolerance of lowering: the model is valid before and
    after (onnx.checker full_check — it accepts com.microsoft nodes, whose schemas onnx does not know), ``modified``
    is honest, a second run changes nothing, and every output of the lowered model is within ``steps``
    quantization steps of the QDQ model (dequantized when the output is an integer tensor; ``output_scales`` gives
    each output's (scale, zero point); other outputs are float and must agree to ``float_atol``)."""
    onnx.checker.check_model(model, full_check=True)
    ir_model = ir.serde.deserialize_model(model)
    result = pass_instance(ir_model)
    assert result.modified == expect_modified, f"modified={result.modified}, expected {expect_modified}"
    lowered = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(lowered, full_check=True)
    before, after = run_both(model, lowered, seed=seed)
    assert set(before) == set(after)
    for name, expected in before.items():
        scale, zero_point = (output_scales or {}).get(name, (None, 0))
        actual = after[name]
        if scale is None:
            assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} vs {expected.dtype}"
            np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=float_atol, err_msg=name)
        else:
            difference = np.abs(dequantize(actual, scale, zero_point) - dequantize(expected, scale, zero_point))
            assert difference.max() <= steps * scale * (1 + 1e-5) + 1e-6, (
                f"{name}: max |diff| {difference.max()} > {steps} step(s) of {scale}"
            )
    again = pass_instance(result.model)
    assert not again.modified, f"{type(pass_instance).__name__} is not idempotent"
    return result.model, lowered, before, after

"""CorrectBias: the expected per-channel output shift of weight quantization is folded into the bias exactly."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.annotate.annotator import annotate
from qgraph.calibrate.driver import CalibrationConfig, calibrate
from qgraph.passes.quantize.correct_bias import CorrectBias, bias_shifts
from qgraph.ptq import QuantizeOptions, compute_parameters, quantize
from qgraph.quant.numerics import fake_quantize, sqnr_db
from qgraph.targets import TargetOptions, get_target
from qgraph.testing import run_model


def _layer(op_type: str, *, pads: int = 1, group: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Relu (inputs with a positive mean, where the shift shows) → Conv or Gemm with a bias."""
    rng = np.random.default_rng(seed)
    if op_type == "Conv":
        weight = rng.standard_normal((6, 4 // group, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["r", "w", "b"], ["y"], pads=[pads] * 4, group=group, name="layer")
        shape, bias = [None, 4, 7, 7], rng.standard_normal(6).astype(np.float32)
    else:
        weight = rng.standard_normal((6, 12)).astype(np.float32)
        node = helper.make_node("Gemm", ["r", "w", "b"], ["y"], transB=1, alpha=0.5, beta=2.0, name="layer")
        shape, bias = [None, 12], rng.standard_normal(6).astype(np.float32)
    shape[0] = "batch"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), node], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    inferred = {info.name: info for info in model.graph.value_info}
    if "y" in inferred:
        model.graph.output[0].CopyFrom(inferred["y"])
    return model


def _batches(model: onnx.ModelProto, count: int = 4, seed: int = 1):
    shape = [dim.dim_value or 8 for dim in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal(shape) + 0.5).astype(np.float32)} for _ in range(count)]


def _plan_and_parameters(model: ir.Model, batches, bits: int = 4):
    rules = get_target("ort-cpu", TargetOptions(weight_bits=bits, per_channel=False)).rules()
    plan = annotate(model, rules)
    ranges = calibrate(model, plan, batches, CalibrationConfig(method="minmax")).ranges
    return plan, compute_parameters(model, plan, ranges, per_channel=False, weight_method="minmax")


def _channel_mean(outputs: list[np.ndarray]) -> np.ndarray:
    axes = (0, *range(2, outputs[0].ndim))
    return np.mean([output.mean(axis=axes) for output in outputs], axis=0)


@pytest.mark.parametrize("op_type, options", [("Conv", {}), ("Conv", {"pads": 0}), ("Conv", {"group": 2}),
                                              ("Gemm", {})])
def test_the_corrected_bias_gives_the_float_layer_s_mean_output_per_channel(op_type, options):
    proto = _layer(op_type, **options)
    batches = _batches(proto)
    model = ir.serde.deserialize_model(proto)
    plan, parameters = _plan_and_parameters(model, batches)
    result = CorrectBias(plan=plan, parameters=parameters, batches=batches, quantized_inputs=False)(model)
    assert result.modified
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    # The float layer, and the layer with fake-quantized weights and the old or the corrected bias.
    weight = numpy_helper.to_array(proto.graph.initializer[0])
    quantized_weight = fake_quantize(weight, parameters["w"])
    plain, corrected = copy.deepcopy(proto), copy.deepcopy(proto)
    for candidate in (plain, corrected):
        candidate.graph.initializer[0].CopyFrom(numpy_helper.from_array(quantized_weight, "w"))
    corrected.graph.initializer[1].CopyFrom(numpy_helper.from_array(model.graph.initializers["b"].const_value.numpy(),
                                                                    "b"))
    reference = _channel_mean([run_model(proto, batch)["y"] for batch in batches])
    before = _channel_mean([run_model(plain, batch)["y"] for batch in batches])
    after = _channel_mean([run_model(corrected, batch)["y"] for batch in batches])
    assert np.abs(before - reference).max() > 1e-2  # 4-bit per-tensor weights: a visible shift
    np.testing.assert_allclose(after, reference, atol=2e-5 * max(1.0, np.abs(reference).max()))


def test_nothing_to_correct_without_planned_biases():
    proto = _layer("Conv")
    batches = _batches(proto)
    model = ir.serde.deserialize_model(proto)
    plan, parameters = _plan_and_parameters(model, batches)
    assert bias_shifts(model, type(plan)(**{**plan.__dict__, "biases": ()}), parameters, batches) == {}


def test_quantize_on_raises_the_output_sqnr_of_a_shifted_layer_and_off_leaves_the_bias():
    proto = _layer("Conv", pads=0)
    batches, test = _batches(proto), _batches(proto, seed=9)
    reference = np.concatenate([run_model(proto, batch)["y"] for batch in test])
    sqnr = {}
    for mode in ("off", "on"):
        options = QuantizeOptions(target_options=TargetOptions(weight_bits=4, per_channel=False, format="qdq"),
                                  calibration=CalibrationConfig(method="minmax"), min_sqnr=None, bias_correction=mode)
        result = quantize(ir.serde.deserialize_model(proto), batches, options)
        outputs = np.concatenate([run_model(result.model, batch)["y"] for batch in test])
        sqnr[mode] = sqnr_db(reference, outputs)
    assert sqnr["on"] > sqnr["off"], sqnr


def test_an_unknown_mode_is_refused():
    from qgraph.errors import QGraphError

    with pytest.raises(QGraphError, match="unknown bias correction"):
        QuantizeOptions(bias_correction="sometimes")


def test_auto_corrects_only_when_the_output_error_calls_for_it(caplog):
    proto = _layer("Conv", pads=0)
    batches = _batches(proto)
    target_options = TargetOptions(weight_bits=4, per_channel=False, format="qdq")

    def biases(mode: str, min_sqnr: float):
        options = QuantizeOptions(target_options=target_options, calibration=CalibrationConfig(method="minmax"),
                                  min_sqnr=min_sqnr, bias_correction=mode)
        result = quantize(ir.serde.deserialize_model(proto), batches, options)
        integer = next((node for node in result.model.graph
                        if node.op_type == "DequantizeLinear" and node.inputs[0].name.startswith("b")), None)
        return (integer.inputs[0].const_value.numpy() if integer is not None else None), result

    off, _ = biases("off", 0.5)
    met, _ = biases("auto", 0.5)  # the bound is met: nothing calls for a correction
    np.testing.assert_array_equal(met, off)
    with caplog.at_level("INFO"):
        missed, result = biases("auto", 99.0)  # still below the bound after the search: correct if it helps
    if "layer" in result.plan.fp32_nodes:  # the layer fell back to FP32: no quantized bias to correct
        assert missed is None and "bias correction: output SQNR" not in caplog.text
    else:
        assert "bias correction: output SQNR" in caplog.text
        assert not np.array_equal(missed, off)

"""Each TensorRT placement rule, asserted on the QDQ model qgraph writes for target tensorrt, which must also run in
onnxruntime (there is no TensorRT here)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from qgraph import runtime
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.ptq import QuantizeOptions, quantize
from tests.ptq.small_models import calibration_batches, residual_cnn


@pytest.fixture(scope="module")
def trt_model() -> onnx.ModelProto:
    options = QuantizeOptions(target="tensorrt", calibration=CalibrationConfig(method="entropy"), min_sqnr=None)
    result = quantize(ir.serde.deserialize_model(residual_cnn()), calibration_batches(), options)
    return ir.serde.serialize_model(result.model)


def _producers(model):
    return {output: node for node in model.graph.node for output in node.output}


def _initializers(model):
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def test_rule_opset_at_least_13(trt_model):
    assert next(entry.version for entry in trt_model.opset_import if entry.domain in ("", "ai.onnx")) >= 13


def test_rule_int8_symmetric_zero_points_everywhere(trt_model):
    initializers = _initializers(trt_model)
    pairs = [node for node in trt_model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert pairs
    for node in pairs:
        zero_point = initializers[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name


def test_rule_qdq_on_every_activation_input_of_compute_ops(trt_model):
    producers = _producers(trt_model)
    compute = [node for node in trt_model.graph.node if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    assert len(compute) == 4
    for node in compute:
        dequantize = producers[node.input[0]]
        assert dequantize.op_type == "DequantizeLinear"
        assert producers[dequantize.input[0]].op_type == "QuantizeLinear"


def test_rule_weights_per_channel_on_the_output_axis(trt_model):
    producers, initializers = _producers(trt_model), _initializers(trt_model)
    for node in trt_model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dequantize = producers[node.input[1]]
        codes, scale = initializers[dequantize.input[0]], initializers[dequantize.input[1]]
        axis = next(attribute.i for attribute in dequantize.attribute if attribute.name == "axis")
        transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        expected_axis = 0 if node.op_type == "Conv" or transposed else 1
        assert axis == expected_axis and scale.shape == (codes.shape[axis],)
        assert codes.dtype == np.int8 and codes.min() >= -127  # narrow range


def test_rule_no_qdq_on_biases(trt_model):
    initializers = _initializers(trt_model)
    for node in trt_model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            assert initializers[node.input[2]].dtype == np.float32


def test_rule_no_qdq_on_compute_outputs(trt_model):
    for node in trt_model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            consumers = [other for other in trt_model.graph.node if node.output[0] in other.input]
            assert all(other.op_type != "QuantizeLinear" for other in consumers), node.name


def test_rule_residual_add_quantizes_the_branch_tensorrt_cannot_fuse(trt_model):
    producers = _producers(trt_model)
    add = next(node for node in trt_model.graph.node if node.op_type == "Add")
    sources = [producers[name].op_type for name in add.input]
    assert sorted(sources) == ["Conv", "DequantizeLinear"]  # conv branch fused by TensorRT, residual branch Q/DQ


def test_tensorrt_model_runs_in_onnxruntime(trt_model):
    onnx.checker.check_model(trt_model, full_check=True)
    feeds = calibration_batches(count=1, seed=3)[0]
    outputs = runtime.run(runtime.create_session(trt_model), feeds)
    assert np.all(np.isfinite(outputs["logits"]))

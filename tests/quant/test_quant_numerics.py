"""quantize / dequantize / fake_quantize against onnxruntime's QuantizeLinear and DequantizeLinear, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.quant.numerics import dequantize, fake_quantize, quantization_step, quantize, sqnr_db
from qgraph.quant.spec import QuantParams, QuantSpec, compute_quant_params

_ONNX_ELEMENT = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
                 np.dtype(np.int16): TensorProto.INT16, np.dtype(np.uint16): TensorProto.UINT16}


def _run_one_node(op_type: str, x: np.ndarray, params: QuantParams, opset: int) -> np.ndarray:
    """Run a one-node QuantizeLinear/DequantizeLinear model with graph optimisation disabled."""
    input_type = TensorProto.FLOAT if op_type == "QuantizeLinear" else _ONNX_ELEMENT[x.dtype]
    output_type = _ONNX_ELEMENT[params.spec.storage_dtype] if op_type == "QuantizeLinear" else TensorProto.FLOAT
    attributes = {} if params.axis is None else {"axis": params.axis}
    node = helper.make_node(op_type, ["x", "scale", "zero_point"], ["y"], **attributes)
    graph = helper.make_graph(
        [node],
        "one_node",
        [helper.make_tensor_value_info("x", input_type, list(x.shape))],
        [helper.make_tensor_value_info("y", output_type, list(x.shape))],
        initializer=[
            numpy_helper.from_array(params.scale, "scale"),
            numpy_helper.from_array(params.zero_point, "zero_point"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _random_params(spec: QuantSpec, channels: int | None, rng: np.random.Generator) -> QuantParams:
    if channels is None:
        return compute_quant_params(spec, -float(rng.uniform(0.5, 3)), float(rng.uniform(0.5, 3)))
    return compute_quant_params(spec, -rng.uniform(0.1, 3, channels), rng.uniform(0.1, 3, channels))


def _test_data(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    x = (rng.standard_normal(shape) * 2.0).astype(np.float32)
    flat = x.reshape(-1)
    flat[:8] = [0.0, -0.0, 1e9, -1e9, 1e-30, -1e-30, 3.4e38, -3.4e38]  # saturation and tiny values
    return x


SPECS = [
    QuantSpec.int8(),
    QuantSpec.uint8(),
    QuantSpec.int8(symmetric=False),
    QuantSpec(bits=8, signed=False, symmetric=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=["int8_sym", "uint8_asym", "int8_asym", "uint8_sym"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_quantize_and_dequantize_match_onnxruntime(spec: QuantSpec, axis: int | None) -> None:
    rng = np.random.default_rng(17)
    x = _test_data((4, 6, 5, 5), rng)
    spec = spec.with_axis(axis)
    params = _random_params(spec, None if axis is None else x.shape[axis], rng)
    # Values exactly halfway between codes exercise round-half-to-even.
    halfway = (np.arange(x.size, dtype=np.float32) % 7 - 3.5).reshape(x.shape)
    step = quantization_step(params, x.ndim)
    x[0] = (halfway * step)[0]

    expected = _run_one_node("QuantizeLinear", x, params, opset=13)
    codes = quantize(x, params)
    assert codes.dtype == expected.dtype
    np.testing.assert_array_equal(codes, expected)

    expected_real = _run_one_node("DequantizeLinear", codes, params, opset=13)
    real = dequantize(codes, params)
    assert real.dtype == np.float32
    np.testing.assert_array_equal(real, expected_real)
    np.testing.assert_array_equal(fake_quantize(x, params), expected_real)


@pytest.mark.parametrize("signed", [True, False])
def test_int16_matches_onnxruntime_opset21(signed: bool) -> None:
    rng = np.random.default_rng(3)
    x = _test_data((3, 50), rng)
    params = _random_params(QuantSpec(bits=16, signed=signed, symmetric=signed), None, rng)
    np.testing.assert_array_equal(quantize(x, params), _run_one_node("QuantizeLinear", x, params, opset=21))


def test_round_half_to_even_and_saturation_by_hand() -> None:
    params = QuantParams(scale=np.float32(1.0), zero_point=np.int8(0), spec=QuantSpec())
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 200.0, -128.5, -1000.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, params), [0, 2, 2, 0, -2, -2, 126, 127, 127, -128, -128])


def test_clip_to_spec_uses_narrow_range() -> None:
    params = compute_quant_params(QuantSpec.int8(narrow_range=True), -1.27, 1.27)
    x = np.array([-5.0, 5.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, params), [-128, 127])  # ONNX saturates to the storage type
    np.testing.assert_array_equal(quantize(x, params, clip_to_spec=True), [-127, 127])


def test_int4_saturates_to_four_bits() -> None:
    params = compute_quant_params(QuantSpec(bits=4, signed=True), -0.7, 0.7)
    codes = quantize(np.array([-10.0, 10.0, 0.0], dtype=np.float32), params)
    np.testing.assert_array_equal(codes, [-8, 7, 0])


def test_nan_quantizes_to_zero_point() -> None:
    params = compute_quant_params(QuantSpec.uint8(), -1.0, 2.0)
    codes = quantize(np.array([np.nan, 0.0], dtype=np.float32), params)
    assert codes[0] == params.zero_point == codes[1]


def test_fake_quantize_error_within_half_step() -> None:
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (8, 16)).astype(np.float32)
    params = compute_quant_params(QuantSpec.int8(axis=0, narrow_range=True), x.min(axis=1), x.max(axis=1))
    error = np.abs(fake_quantize(x, params) - x)
    assert np.all(error <= quantization_step(params, x.ndim) * 0.5 * (1 + 1e-6))


def test_per_channel_shape_mismatch_is_refused() -> None:
    params = compute_quant_params(QuantSpec.int8(axis=1), np.full(3, -1.0), np.full(3, 1.0))
    with pytest.raises(ValueError, match="channels"):
        quantize(np.zeros((2, 4), dtype=np.float32), params)


def test_sqnr_db() -> None:
    reference = np.array([1.0, -1.0, 2.0, 0.0])
    assert sqnr_db(reference, reference) == float("inf")
    assert sqnr_db(np.zeros(3), np.ones(3)) == float("-inf")
    noisy = reference + np.array([0.1, 0.0, 0.0, 0.0])
    assert sqnr_db(reference, noisy) == pytest.approx(10 * np.log10(6.0 / 0.01))
    with pytest.raises(ValueError, match="shape"):
        sqnr_db(np.zeros(3), np.zeros(4))

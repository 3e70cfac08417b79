"""QuantSpec bounds, compute_quant_params on hand-computed ranges, degenerate ranges and property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from qgraph.quant.numerics import dequantize, quantize
from qgraph.quant.spec import MINIMUM_SCALE, QuantParams, QuantSpec, compute_quant_params, representable_range


@pytest.mark.parametrize(
    ("spec", "qmin", "qmax"),
    [
        (QuantSpec(bits=8, signed=True), -128, 127),
        (QuantSpec(bits=8, signed=True, narrow_range=True), -127, 127),
        (QuantSpec(bits=8, signed=True, reduce_range=True), -64, 63),
        (QuantSpec(bits=8, signed=False, symmetric=False), 0, 255),
        (QuantSpec(bits=8, signed=False, reduce_range=True), 0, 127),
        (QuantSpec(bits=8, signed=False, narrow_range=True), 1, 255),
        (QuantSpec(bits=4, signed=True), -8, 7),
        (QuantSpec(bits=4, signed=False), 0, 15),
        (QuantSpec(bits=16, signed=True), -32768, 32767),
        (QuantSpec(bits=16, signed=False), 0, 65535),
    ],
)
def test_spec_bounds(spec: QuantSpec, qmin: int, qmax: int) -> None:
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    assert spec.levels == qmax - qmin + 1


def test_spec_types_and_validation() -> None:
    assert QuantSpec(bits=4, signed=True).storage_dtype == np.int8
    assert QuantSpec(bits=4, signed=False).onnx_type == TensorProto.UINT4
    assert QuantSpec.uint8().symmetric is False and QuantSpec.uint8().signed is False
    assert QuantSpec.int8().symmetric is True
    assert QuantSpec().with_axis(1).axis == 1
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=7)
    with pytest.raises(ValueError, match="reduce_range"):
        QuantSpec(bits=4, reduce_range=True)
    with pytest.raises(ValueError):
        QuantParams(scale=np.float32(0.0), zero_point=0, spec=QuantSpec())
    with pytest.raises(ValueError):
        QuantParams(scale=np.float32(1.0), zero_point=300, spec=QuantSpec.uint8())


def test_symmetric_int8_hand_computed() -> None:
    params = compute_quant_params(QuantSpec.int8(), -1.0, 2.0)
    assert params.scale.dtype == np.float32 and params.scale.shape == ()
    assert params.scale == np.float32(2.0 / 127.5)
    assert params.zero_point == 0 and params.zero_point.dtype == np.int8


def test_narrow_symmetric_int8_hand_computed() -> None:
    params = compute_quant_params(QuantSpec.int8(narrow_range=True), -3.0, 1.27)
    assert params.scale == np.float32(3.0 / 127.0)
    assert params.zero_point == 0


def test_symmetric_uint8_has_zero_point_128() -> None:
    params = compute_quant_params(QuantSpec(bits=8, signed=False, symmetric=True), -1.0, 1.0)
    assert params.zero_point == 128 and params.zero_point.dtype == np.uint8
    assert params.scale == np.float32(1.0 / 127.5)


def test_asymmetric_uint8_hand_computed() -> None:
    params = compute_quant_params(QuantSpec.uint8(), -1.0, 2.0)
    assert params.scale == np.float32(3.0 / 255.0)
    # zero_point = round(0 - (-1) / (3/255)) = round(85.0) = 85
    assert params.zero_point == 85


def test_asymmetric_range_is_extended_to_zero() -> None:
    positive = compute_quant_params(QuantSpec.uint8(), 2.0, 4.0)  # becomes [0, 4]
    assert positive.scale == np.float32(4.0 / 255.0) and positive.zero_point == 0
    negative = compute_quant_params(QuantSpec.uint8(), -4.0, -2.0)  # becomes [-4, 0]
    assert negative.zero_point == 255


def test_per_channel_params() -> None:
    spec = QuantSpec.int8(axis=0)
    params = compute_quant_params(spec, np.array([-1.0, 0.0, -2.0]), np.array([0.5, 0.0, 4.0]))
    np.testing.assert_array_equal(params.scale, np.float32([1 / 127.5, 1.0, 4 / 127.5]))
    np.testing.assert_array_equal(params.zero_point, [0, 0, 0])
    with pytest.raises(ValueError, match="1-D"):
        compute_quant_params(spec, -1.0, 1.0)
    with pytest.raises(ValueError, match="scalar"):
        compute_quant_params(QuantSpec(), np.array([-1.0]), np.array([1.0]))


@pytest.mark.parametrize(
    "spec", [QuantSpec.int8(), QuantSpec.uint8(), QuantSpec(bits=4, signed=False, symmetric=False)]
)
@pytest.mark.parametrize(
    ("minimum", "maximum"),
    [(0.0, 0.0), (3.0, 3.0), (-2.5, -2.5), (1e-30, 1e-30), (-1e-38, 1e-38), (1e-45, 2e-45), (0.0, 1e-20)],
)
def test_degenerate_ranges_give_finite_positive_scale(spec: QuantSpec, minimum: float, maximum: float) -> None:
    params = compute_quant_params(spec, minimum, maximum)
    scale = float(params.scale)
    assert math.isfinite(scale) and scale >= MINIMUM_SCALE
    assert math.isfinite(1.0 / np.float32(scale))
    assert spec.qmin <= int(params.zero_point) <= spec.qmax
    assert dequantize(quantize(np.float32(0.0), params), params) == 0.0


def test_zero_width_range_gets_unit_scale() -> None:
    assert compute_quant_params(QuantSpec.uint8(), 0.0, 0.0).scale == 1.0


def test_huge_range_does_not_overflow() -> None:
    largest = float(np.finfo(np.float32).max)
    for spec in (QuantSpec.int8(), QuantSpec.uint8(), QuantSpec(bits=4)):
        params = compute_quant_params(spec, -largest, largest)
        assert np.isfinite(params.scale) and params.scale > 0
        params = compute_quant_params(spec, -1e300, 1e300)  # float64 bounds beyond float32 are clipped
        assert np.isfinite(params.scale)


def test_non_finite_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        compute_quant_params(QuantSpec(), float("nan"), 1.0)
    with pytest.raises(ValueError, match="finite"):
        compute_quant_params(QuantSpec(), -1.0, float("inf"))


def test_representable_range_covers_asymmetric_range() -> None:
    params = compute_quant_params(QuantSpec.uint8(), -1.0, 3.0)
    low, high = representable_range(params)
    assert low <= -1.0 + float(params.scale) and high >= 3.0 - float(params.scale)


_SPECS = st.builds(
    QuantSpec,
    bits=st.sampled_from([4, 8, 16]),
    signed=st.booleans(),
    symmetric=st.booleans(),
    narrow_range=st.booleans(),
    reduce_range=st.just(False),
) | st.builds(QuantSpec, bits=st.just(8), signed=st.booleans(), symmetric=st.booleans(), reduce_range=st.just(True))
_BOUNDS = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=300, deadline=None)
@given(spec=_SPECS, first=_BOUNDS, second=_BOUNDS)
def test_compute_quant_params_properties(spec: QuantSpec, first: float, second: float) -> None:
    minimum, maximum = min(first, second), max(first, second)
    params = compute_quant_params(spec, minimum, maximum)
    scale = float(params.scale)
    assert math.isfinite(scale) and scale > 0 and scale >= MINIMUM_SCALE
    zero_point = int(params.zero_point)
    assert spec.qmin <= zero_point <= spec.qmax
    if spec.symmetric:
        assert zero_point == spec.symmetric_zero_point
    # Zero is exactly representable: quantizes to the zero point and back to 0.
    code = quantize(np.float32(0.0), params)
    assert int(code) == zero_point and float(dequantize(code, params)) == 0.0
    # The range is covered up to one step (and up to the half-step clipped by symmetric int8's 127.5 end).
    low, high = representable_range(params)
    tolerance = 1.01 * scale + 1e-6 * max(abs(minimum), abs(maximum))
    assert low <= min(minimum, 0.0) + tolerance
    assert high >= max(maximum, 0.0) - tolerance

"""Entropy, percentile and MSE ranges on Gaussian, Laplacian, ReLU and skewed data."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.calibrate.observers import HistogramObserver
from qgraph.calibrate.observers.histogram_ranges import histogram_quantile, kl_threshold_bins
from qgraph.quant.numerics import fake_quantize
from qgraph.quant.spec import QuantSpec, compute_quant_params

METHODS = ("entropy", "percentile", "mse")


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    gaussian = rng.standard_normal(200_000).astype(np.float32)
    return {
        "gaussian": gaussian,
        "laplacian": rng.laplace(size=200_000).astype(np.float32),
        "relu": np.maximum(gaussian, 0.0),
        "skewed": (rng.lognormal(0.0, 1.0, 200_000) - 0.5).astype(np.float32),
    }


DATA = _distributions()
SPECS = {"int8": QuantSpec.int8(), "uint8": QuantSpec.uint8()}


def _observer(data: np.ndarray, spec: QuantSpec, **options) -> HistogramObserver:
    observer = HistogramObserver(spec, **options)
    for chunk in np.array_split(data, 4):
        observer.update(chunk)
    return observer


def _squared_error(data: np.ndarray, spec: QuantSpec, low: float, high: float) -> float:
    params = compute_quant_params(spec, low, high)
    return float(np.sum((fake_quantize(data, params, clip_to_spec=True) - data).astype(np.float64) ** 2))


@pytest.mark.parametrize("name", list(DATA))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_ranges_lie_within_the_data_and_contain_the_bulk(name: str, spec_name: str) -> None:
    data, spec = DATA[name], SPECS[spec_name]
    observer = _observer(data, spec)
    median_magnitude = float(np.median(np.abs(data)))
    for method in METHODS:
        low, high = observer.compute_range(method)
        assert data.min() <= low <= high <= data.max(), method
        if data.min() >= 0:
            assert low == 0.0
        # A sane clipping keeps far more than the typical value.
        assert max(-low, high) > 3 * median_magnitude, (method, low, high)


@pytest.mark.parametrize("name", ["gaussian", "laplacian"])
def test_percentile_clips_outliers(name: str) -> None:
    data = DATA[name].copy()
    data[:5] = [80.0, -90.0, 70.0, 100.0, -60.0]
    observer = _observer(data, QuantSpec.int8(), method="percentile", percentile=99.99)
    low, high = observer.compute_range()
    magnitude = np.abs(data)
    expected = float(np.percentile(magnitude, 99.99))
    assert high == pytest.approx(expected, rel=0.02) and low == -high
    asymmetric = _observer(data, QuantSpec.uint8(), method="percentile", percentile=99.99)
    low, high = asymmetric.compute_range()
    assert low == pytest.approx(float(np.percentile(data, 0.01)), rel=0.02)
    assert high == pytest.approx(float(np.percentile(data, 99.99)), rel=0.02)


def test_histogram_quantile_interpolates() -> None:
    counts = np.array([0, 10, 10, 0])
    assert histogram_quantile(counts, -2.0, 1.0, 0.5) == pytest.approx(0.0)
    assert histogram_quantile(counts, -2.0, 1.0, 0.75) == pytest.approx(0.5)
    assert histogram_quantile(counts, -2.0, 1.0, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("name", list(DATA))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_mse_range_beats_a_grid_of_alternatives(name: str, spec_name: str) -> None:
    data, spec = DATA[name], SPECS[spec_name]
    observer = _observer(data, spec)
    low, high = observer.compute_range("mse")
    chosen = _squared_error(data, spec, low, high)
    data_low, data_high = float(min(data.min(), 0)), float(data.max())
    for fraction in (0.25, 0.5, 0.7, 0.85, 1.0):
        alternative = _squared_error(data, spec, fraction * data_low, fraction * data_high)
        assert chosen <= alternative * 1.03, (fraction, low, high, chosen, alternative)


@pytest.mark.parametrize("name", list(DATA))
def test_entropy_and_mse_beat_min_max_with_outliers(name: str) -> None:
    data = DATA[name].copy()
    data[:3] = [data.max() * 8, data.min() * 8 if data.min() < 0 else 0.0, data.max() * 6]
    spec = QuantSpec.int8()
    observer = _observer(data, spec)
    minmax_error = _squared_error(data, spec, float(data.min()), float(data.max()))
    low, high = observer.compute_range("mse")
    assert high < data.max()
    assert _squared_error(data, spec, low, high) < minmax_error
    # KL ignores the squared size of a few outliers but must clip them and serve the bulk better than min-max.
    low, high = observer.compute_range("entropy")
    assert high < data.max() / 4
    bulk = data[3:]
    bulk_minmax = _squared_error(bulk, spec, float(data.min()), float(data.max()))
    assert _squared_error(bulk, spec, low, high) < bulk_minmax / 4


def test_entropy_threshold_on_relu_is_not_pulled_down_by_zeros() -> None:
    data = DATA["relu"]
    low, high = _observer(data, QuantSpec.uint8()).compute_range("entropy")
    assert low == 0.0 and high > float(np.percentile(data, 99.9))


def test_kl_threshold_uses_full_range_without_tail() -> None:
    flat = np.zeros(1024)
    flat[1:400] = 1000.0  # uniform: no tail worth clipping
    assert kl_threshold_bins(flat, 128) >= 395
    assert kl_threshold_bins(np.array([0.0, 5.0, 0.0, 7.0]), 128) == 4  # fewer bins than levels: everything
    assert kl_threshold_bins(np.zeros(16), 8) == 0


def test_skewed_asymmetric_range_keeps_the_short_side() -> None:
    data = DATA["skewed"]
    for method in METHODS:
        low, high = _observer(data, QuantSpec.uint8()).compute_range(method)
        assert float(data.min()) <= low <= 0.5 * float(data.min()), method  # the short side is not dropped
        assert high > 5.0, method


def test_mse_errors_equal_a_per_bin_evaluation() -> None:
    """The shared-edge evaluation equals integrating each occupied bin on its own (the definition)."""
    from qgraph.calibrate.observers.histogram_ranges import HistogramView, _error_antiderivative, expected_squared_error
    from qgraph.quant.spec import QuantSpec, compute_quant_params

    rng = np.random.default_rng(4)
    counts = rng.integers(0, 50, 64).astype(np.int64)
    counts[[0, 1, 30, 63]] = 0
    view = HistogramView(counts=counts, first_edge=-32 * 0.125, width=0.125, minimum=-3.9, maximum=3.77)
    spec = QuantSpec.uint8()
    lows, highs = np.array([-3.9, -2.0, -1.0]), np.array([3.77, 2.5, 1.0])
    params = compute_quant_params(spec.with_axis(0), lows, highs)
    expected = np.zeros(3)
    for index in np.flatnonzero(counts):
        a = max(view.first_edge + index * view.width, view.minimum)
        b = min(view.first_edge + (index + 1) * view.width, view.maximum)
        for k in range(3):
            scale, zero = float(params.scale[k]), float(params.zero_point[k])
            clip_low, clip_high = (spec.qmin - zero) * scale, (spec.qmax - zero) * scale
            args = (np.float64(scale), np.float64(clip_low), np.float64(clip_high))
            expected[k] += counts[index] * (_error_antiderivative(np.float64(b), *args)
                                            - _error_antiderivative(np.float64(a), *args)) / (b - a)
    np.testing.assert_allclose(expected_squared_error(view, spec, lows, highs), expected, rtol=1e-9)

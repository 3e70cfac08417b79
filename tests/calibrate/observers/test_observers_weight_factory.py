"""Per-channel MSE weight observer, the observer factory and state reconstruction."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.calibrate.observers import (
    OBSERVER_METHODS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMSEWeightObserver,
    create_observer,
    observer_from_state,
)
from qgraph.quant.numerics import fake_quantize
from qgraph.quant.spec import QuantSpec, compute_quant_params


def _weight(rng: np.random.Generator) -> np.ndarray:
    weight = (
        rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * rng.uniform(0.1, 2.0, (16, 1, 1, 1)).astype(np.float32)
    )
    weight[3, 0, 0, 0] = 25.0  # one channel with an outlier
    weight[5] = 0.0  # a dead channel
    return weight


def _per_channel_error(weight: np.ndarray, spec: QuantSpec, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    params = compute_quant_params(spec, low, high)
    difference = fake_quantize(weight, params, clip_to_spec=True) - weight
    return np.sum(np.moveaxis(difference, spec.axis, 0).reshape(weight.shape[spec.axis], -1) ** 2, axis=1)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec.int8(axis=0, narrow_range=True), QuantSpec(bits=4, signed=True, axis=0), QuantSpec.uint8(axis=1)],
    ids=["int8_narrow", "int4", "uint8_axis1"],
)
def test_mse_weight_error_is_at_most_min_max_error(spec: QuantSpec) -> None:
    weight = _weight(np.random.default_rng(2))
    minmax = MinMaxObserver(spec)
    minmax.update(weight)
    mse = PerChannelMSEWeightObserver(spec)
    mse.update(weight)
    minmax_error = _per_channel_error(weight, spec, *minmax.compute_range())
    low, high = mse.compute_range()
    mse_error = _per_channel_error(weight, spec, low, high)
    assert np.all(mse_error <= minmax_error * (1 + 1e-6) + 1e-12)
    minmax_low, minmax_high = minmax.compute_range()
    assert np.all(low >= np.minimum(minmax_low, 0)) and np.all(high <= np.maximum(minmax_high, 0))
    if spec.axis == 0:
        assert low[5] == high[5] == 0.0
    if spec.bits == 4:  # with 16 levels clipping pays off on typical channels
        assert mse_error.sum() < minmax_error.sum()
        typical = np.arange(16) != 3
        assert mse_error[typical].sum() < 0.9 * minmax_error[typical].sum()


def test_mse_weight_clips_heavy_tailed_int8_channels() -> None:
    rng = np.random.default_rng(4)
    weight = rng.laplace(size=(4, 20000)).astype(np.float32)
    spec = QuantSpec.int8(axis=0, narrow_range=True)
    observer = PerChannelMSEWeightObserver(spec)
    observer.update(weight)
    low, high = observer.compute_range()
    assert np.all(high < weight.max(axis=1)) and np.all(low > weight.min(axis=1))
    minmax = (weight.min(axis=1).astype(np.float64), weight.max(axis=1).astype(np.float64))
    assert np.all(_per_channel_error(weight, spec, low, high) < _per_channel_error(weight, spec, *minmax))


def test_mse_weight_observer_merge_concatenates_and_ignores_non_finite() -> None:
    weight = _weight(np.random.default_rng(3))
    spec = QuantSpec.int8(axis=0)
    whole = PerChannelMSEWeightObserver(spec)
    whole.update(weight)
    first, second = PerChannelMSEWeightObserver(spec), PerChannelMSEWeightObserver(spec)
    first.update(weight[:, :4])
    second.update(weight[:, 4:])
    for merged_bound, whole_bound in zip(first.merge(second).compute_range(), whole.compute_range()):
        np.testing.assert_array_equal(merged_bound, whole_bound)
    polluted = weight.copy()
    polluted[0, 0, 0, 0] = np.nan
    polluted[1, 0, 0, 0] = np.inf
    observer = PerChannelMSEWeightObserver(spec)
    observer.update(polluted)
    low, high = observer.compute_range()
    assert np.all(np.isfinite(low)) and np.all(np.isfinite(high))
    rebuilt = observer_from_state(observer.state_dict())
    np.testing.assert_array_equal(rebuilt.compute_range()[1], high)
    with pytest.raises(ValueError, match="per-channel"):
        PerChannelMSEWeightObserver(QuantSpec.int8())


@pytest.mark.parametrize(
    ("method", "spec", "expected"),
    [
        ("minmax", QuantSpec.uint8(), MinMaxObserver),
        ("minmax", QuantSpec.int8(axis=0), MinMaxObserver),
        ("ema", QuantSpec.uint8(), MovingAverageMinMaxObserver),
        ("entropy", QuantSpec.int8(), HistogramObserver),
        ("percentile", QuantSpec.uint8(), HistogramObserver),
        ("mse", QuantSpec.uint8(), HistogramObserver),
        ("mse", QuantSpec.int8(axis=0), PerChannelMSEWeightObserver),
    ],
)
def test_create_observer(method: str, spec: QuantSpec, expected: type) -> None:
    observer = create_observer(method, spec)
    assert type(observer) is expected and observer.spec == spec
    if isinstance(observer, HistogramObserver):
        assert observer.method == method


def test_create_observer_options_and_errors() -> None:
    observer = create_observer("percentile", QuantSpec.uint8(), bins=256, percentile=99.9)
    assert observer.bins == 256 and observer.percentile == 99.9
    assert create_observer("ema", QuantSpec.uint8(), momentum=0.5).momentum == 0.5
    with pytest.raises(ValueError, match="minmax, ema, entropy, percentile, mse"):
        create_observer("kl", QuantSpec.int8())
    with pytest.raises(ValueError, match="per tensor only"):
        create_observer("entropy", QuantSpec.int8(axis=0))
    with pytest.raises(ValueError, match="unknown observer kind"):
        observer_from_state({"observer": "nope"})
    assert OBSERVER_METHODS == ("minmax", "ema", "entropy", "percentile", "mse")

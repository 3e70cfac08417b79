"""HistogramObserver state: exact power-of-two re-binning, merging, order independence, edge cases, memory."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qgraph.quant.observers import HistogramObserver, observer_from_state
from qgraph.quant.observers.histogram import rebinned_counts
from qgraph.quant.spec import QuantSpec


def _direct_histogram(observer: HistogramObserver, values: np.ndarray) -> np.ndarray:
    """The histogram of ``values`` computed in one go in the observer's final layout."""
    values = values[np.isfinite(values)].astype(np.float64)
    counts, _ = np.histogram(values, bins=observer.bin_edges())
    return counts


@pytest.fixture
def growing_batches() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        np.abs(rng.standard_normal(5000)).astype(np.float32) * 0.01,  # non-negative, tiny range
        np.abs(rng.standard_normal(5000)).astype(np.float32) * 3.0,  # grows the range
        rng.standard_normal(5000).astype(np.float32) * 40.0,  # first negative values: signed layout
        rng.laplace(size=5000).astype(np.float32),
    ]


def test_rebinning_preserves_total_count_and_matches_direct_histogram(growing_batches) -> None:
    observer = HistogramObserver(bins=256)
    seen = 0
    for batch in growing_batches:
        observer.update(batch)
        seen += batch.size
        assert int(observer.counts.sum()) == seen == observer.count
    assert observer.signed_layout
    everything = np.concatenate(growing_batches)
    np.testing.assert_array_equal(observer.counts, _direct_histogram(observer, everything))
    assert observer.exponent == math.frexp(float(np.abs(everything).max()))[1]


def test_merge_of_halves_equals_whole_exactly(growing_batches) -> None:
    whole, first, second = HistogramObserver(bins=512), HistogramObserver(bins=512), HistogramObserver(bins=512)
    for index, batch in enumerate(growing_batches):
        whole.update(batch)
        (first if index in (0, 3) else second).update(batch)
    merged = first.merge(second)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.exponent, merged.signed_layout, merged.count) == (whole.exponent, whole.signed_layout, whole.count)
    assert (merged.minimum, merged.maximum) == (whole.minimum, whole.maximum)
    for method in ("entropy", "percentile", "mse"):
        assert merged.compute_range(method) == whole.compute_range(method)
    # Neither input was modified, and merging with an empty observer is the identity.
    assert first.count + second.count == whole.count
    np.testing.assert_array_equal(first.merge(HistogramObserver(bins=512)).counts, first.counts)
    np.testing.assert_array_equal(HistogramObserver(bins=512).merge(first).counts, first.counts)


def test_batch_order_does_not_matter(growing_batches) -> None:
    forward, backward = HistogramObserver(bins=128), HistogramObserver(bins=128)
    for batch in growing_batches:
        forward.update(batch)
    for batch in reversed(growing_batches):
        backward.update(batch)
    np.testing.assert_array_equal(forward.counts, backward.counts)


def test_rebinned_counts_nests_bins() -> None:
    counts = np.arange(16, dtype=np.int64)
    # Non-negative [0, R) -> signed [-2R, 2R): width x4, old bins land in the upper half, four at a time.
    moved = rebinned_counts(counts, 0, False, 1, True, 4)
    assert moved.sum() == counts.sum()
    np.testing.assert_array_equal(moved[8:12], counts.reshape(4, 4).sum(axis=1))
    assert not moved[:8].any() and not moved[12:].any()
    with pytest.raises(ValueError, match="wider"):
        rebinned_counts(counts, 2, True, 2, False, 4)


def test_values_on_bin_edges_and_at_the_range_end() -> None:
    observer = HistogramObserver(bins=16)
    observer.update(np.array([0.0, 0.25, 0.5, 1.0, 2.0, 3.75], dtype=np.float32))
    assert observer.exponent == 2  # 3.75 < 4 = 2^2, strictly above the largest magnitude
    np.testing.assert_array_equal(np.flatnonzero(observer.counts), [0, 1, 2, 4, 8, 15])
    observer.update(np.array([-4.0], dtype=np.float32))  # exactly a power of two: the range doubles to [-8, 8)
    assert observer.exponent == 3 and observer.signed_layout
    assert observer.counts[observer.offset - 4] == 1  # -4 is bin [-4, -3)
    assert observer.counts[observer.offset] == 3  # 0, 0.25 and 0.5 share bin [0, 1)


def test_non_finite_values_are_ignored() -> None:
    observer = HistogramObserver(bins=64)
    observer.update(np.array([np.nan, np.inf, -np.inf]))
    assert observer.count == 0 and observer.exponent is None
    assert observer.compute_range() == (0.0, 0.0)
    observer.update(np.array([1.0, np.nan, -np.inf, 2.0, np.inf], dtype=np.float32))
    assert observer.count == 2 and observer.counts.sum() == 2
    assert (observer.minimum, observer.maximum) == (1.0, 2.0)


def test_all_zero_tensor_then_data() -> None:
    observer = HistogramObserver(bins=64)
    observer.update(np.zeros((10, 10), dtype=np.float32))
    for method in ("entropy", "percentile", "mse"):
        assert observer.compute_range(method) == (0.0, 0.0)
    assert observer.compute_quant_params().scale == 1.0
    observer.update(np.array([-3.0, 5.0], dtype=np.float32))
    assert observer.counts[observer.offset] == 100  # the zeros stay in bin [0, w)
    assert observer.counts.sum() == 102


@pytest.mark.parametrize("value", [3.0, -2.5, 1e-30, 1e30, 3.4e38, 1e-44])
def test_single_repeated_value(value: float) -> None:
    observer = HistogramObserver(QuantSpec.uint8(), bins=128)
    observer.update(np.full(1000, value, dtype=np.float32))
    assert observer.counts.sum() == 1000
    for method in ("entropy", "percentile", "mse"):
        low, high = observer.compute_range(method)
        stored = float(np.float32(value))
        assert (low, high) == ((0.0, stored) if stored > 0 else (stored, 0.0)) or (low, high) == (stored, stored)
        params = observer.compute_quant_params()
        assert np.isfinite(params.scale) and params.scale > 0


def test_float64_and_integer_inputs() -> None:
    observer = HistogramObserver(bins=64)
    observer.update(np.array([1e-200, 0.5, -1e300]))  # float64 beyond the float32 range
    observer.update(np.array([3, -7], dtype=np.int64))
    assert observer.count == 5 and observer.counts.sum() == 5
    assert observer.minimum == -1e300


def test_state_is_constant_size_and_round_trips(growing_batches) -> None:
    observer = HistogramObserver(bins=256, method="percentile", percentile=99.9)
    sizes = set()
    for _ in range(3):
        for batch in growing_batches:
            observer.update(batch)
            state = observer.state_dict()
            sizes.add(state["counts"].nbytes)
    assert sizes == {256 * 8}
    rebuilt = observer_from_state(observer.state_dict())
    assert isinstance(rebuilt, HistogramObserver) and rebuilt.percentile == 99.9
    np.testing.assert_array_equal(rebuilt.counts, observer.counts)
    assert rebuilt.compute_range() == observer.compute_range()


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="power of two"):
        HistogramObserver(bins=1000)
    with pytest.raises(ValueError, match="valid methods"):
        HistogramObserver(method="kl")
    with pytest.raises(ValueError, match="per tensor"):
        HistogramObserver(QuantSpec.int8(axis=0))
    with pytest.raises(ValueError, match="bins"):
        HistogramObserver(bins=64).merge(HistogramObserver(bins=128))

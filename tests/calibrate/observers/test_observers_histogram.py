"""HistogramObserver state: exact power-of-two re-binning, merging, order independence, edge cases, memory."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qgraph.calibrate.observers import HistogramObserver, histogram, observer_from_state
from qgraph.calibrate.observers.histogram import rebinned_counts
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


# ------------------------------------------------------------------------------------ native kernel vs numpy path
def _kernel_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    relu = np.maximum(rng.standard_normal(70_001), 0).astype(np.float32)  # half exact zeros, odd length
    return [
        relu,
        rng.standard_normal(65_539).astype(np.float32) * 7.0,  # signed layout, not a multiple of the block
        rng.standard_normal(1_003).astype(np.float64) * 1e-3,  # float64 input
        (rng.standard_normal(999) * 1e-41).astype(np.float32),  # subnormals: width factor beyond float32's range
        (rng.standard_normal(999) * 1e37).astype(np.float32),  # huge magnitudes
        np.array([-0.0, 0.0, -1e-45, 1e-45, 1.0, -1.0, 2.0 - 2**-22], dtype=np.float32),  # edges, -0, tiny
        np.arange(-50, 50, dtype=np.float32) / 8,  # exactly on bin edges
    ]


@pytest.mark.skipif(not histogram.NATIVE, reason="the native loops were not built (no C compiler)")
@pytest.mark.parametrize("case", range(len(_kernel_cases())))
def test_native_kernel_counts_equal_the_numpy_path(case: int) -> None:
    data = _kernel_cases()[case]
    observers = {native: HistogramObserver(bins=512) for native in (True, False)}
    for native, observer in observers.items():
        # two batches, the second growing the range: re-binning then accumulation on both paths
        for batch in (data[: data.size // 2] * 0.25, data):
            flat = batch.reshape(-1)
            low, high = float(flat.min()), float(flat.max())
            magnitude = max(-low, high)
            needed = math.frexp(magnitude)[1] if magnitude > 0 else histogram.ZERO_ONLY_EXPONENT
            observer._rebin(needed if observer.exponent is None else max(observer.exponent, needed),
                            observer.signed_layout or low < 0)
            observer._accumulate(flat, native=native)
    assert observers[True].counts.sum() == observers[False].counts.sum() == data.size + data.size // 2
    np.testing.assert_array_equal(observers[True].counts, observers[False].counts)


@pytest.mark.skipif(not histogram.NATIVE, reason="the native loops were not built (no C compiler)")
def test_native_kernel_flushes_its_32_bit_lanes_on_long_inputs() -> None:
    """More than one 2^24-value chunk: every value still counted once, all in the zero bin here."""
    observer = HistogramObserver(bins=64)
    observer.update(np.zeros((1 << 24) + 7, dtype=np.float32))
    assert observer.counts[0] == (1 << 24) + 7 == observer.counts.sum()


@pytest.mark.skipif(not histogram.NATIVE, reason="the native loops were not built (no C compiler)")
def test_native_kernel_refuses_wrong_buffers() -> None:
    counts = np.zeros(16, dtype=np.int64)
    with pytest.raises(TypeError, match="float32 or float64"):
        histogram._native.bin_counts(np.zeros(4, dtype=np.int32), 0, 0, counts, False)
    with pytest.raises(TypeError, match="int64"):
        histogram._native.bin_counts(np.zeros(4, dtype=np.float32), 0, 0, counts.astype(np.int32), False)
    with pytest.raises(ValueError, match="offset"):
        histogram._native.bin_counts(np.zeros(4, dtype=np.float32), 0, 16, counts, False)
    with pytest.raises(ValueError):
        histogram._native.bin_counts(np.zeros(4, dtype=np.float32), 0, 0, counts[::2], False)  # not contiguous


def test_the_native_kernel_is_built_where_a_c_compiler_exists() -> None:
    """The package build compiles the kernel (setup.py); without it calibration is about twice as slow."""
    import shutil
    import sysconfig

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine: the numpy path is used")
    assert histogram.NATIVE


def _update_sequence() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    relu = np.maximum(rng.standard_normal((4, 8, 33)), 0).astype(np.float32)
    with_nan = rng.standard_normal(3000).astype(np.float32)
    with_nan[[5, 700, 2999]] = [np.nan, np.inf, -np.inf]
    return [
        relu * 0.5,
        relu,  # same layout: the one-pass path counts it all
        relu * 9.0,  # grows the range from the first block
        np.concatenate([relu.reshape(-1) * 0.1, relu.reshape(-1) * 40.0]),  # grows after some blocks
        np.concatenate([relu.reshape(-1), [-1e-45], relu.reshape(-1)]).astype(np.float32),  # first negative, late
        with_nan,
        np.zeros(1000, dtype=np.float32),
        rng.standard_normal(513).astype(np.float64) * 1e-3,
    ]


@pytest.mark.skipif(not histogram.NATIVE, reason="the native loops were not built (no C compiler)")
@pytest.mark.parametrize("bins", [64, 2048])
def test_one_pass_updates_equal_the_numpy_observer(bins: int, monkeypatch) -> None:
    """Whole updates, stops and re-binning included: the state equals the pure-numpy observer's, count for count."""
    native = HistogramObserver(bins=bins)
    for batch in _update_sequence():
        native.update(batch)
    monkeypatch.setattr(histogram, "NATIVE", False)
    reference = HistogramObserver(bins=bins)
    for batch in _update_sequence():
        reference.update(batch)
    native_state, reference_state = native.state_dict(), reference.state_dict()
    np.testing.assert_array_equal(native_state.pop("counts"), reference_state.pop("counts"))
    assert native_state == reference_state
    assert native.count == sum(int(np.isfinite(batch).sum()) for batch in _update_sequence())


@pytest.mark.skipif(not histogram.NATIVE, reason="the native loops were not built (no C compiler)")
def test_native_min_max_matches_numpy_and_flags_non_finite() -> None:
    from qgraph.calibrate.observers import base

    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        values = rng.standard_normal(1001).astype(dtype) * 5
        assert base._native.min_max(values) == (float(values.min()), float(values.max()), True)
        for bad in (np.nan, np.inf, -np.inf):
            spoiled = values.copy()
            spoiled[0 if bad is np.nan else 600] = bad
            assert base._native.min_max(spoiled)[2] is False
            low, high, count = base.finite_min_max(spoiled)
            assert (low, high, count) == (float(values[1:].min() if bad is np.nan else np.delete(values, 600).min()),
                                          float(values[1:].max() if bad is np.nan else np.delete(values, 600).max()),
                                          1000)

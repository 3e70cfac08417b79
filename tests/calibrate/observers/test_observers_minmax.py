"""MinMaxObserver and MovingAverageMinMaxObserver: exact ranges, merging, EMA, non-finite values, state."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.calibrate.observers import MinMaxObserver, MovingAverageMinMaxObserver, observer_from_state
from qgraph.quant.spec import QuantSpec


@pytest.fixture
def batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, 3, 8, 8)).astype(np.float32) * (index + 1) for index in range(6)]


def test_minmax_per_tensor_is_exact(batches: list[np.ndarray]) -> None:
    observer = MinMaxObserver(QuantSpec.uint8())
    for batch in batches:
        observer.update(batch)
    everything = np.concatenate([batch.ravel() for batch in batches])
    assert observer.compute_range() == (float(everything.min()), float(everything.max()))
    assert observer.count == everything.size


def test_minmax_per_channel_axis(batches: list[np.ndarray]) -> None:
    observer = MinMaxObserver(QuantSpec.int8(axis=1))
    for batch in batches:
        observer.update(batch)
    everything = np.concatenate(batches, axis=0)
    low, high = observer.compute_range()
    np.testing.assert_array_equal(low, everything.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(high, everything.max(axis=(0, 2, 3)))
    params = observer.compute_quant_params()
    assert params.scale.shape == (3,)


@pytest.mark.parametrize("spec", [QuantSpec.uint8(), QuantSpec.int8(axis=1)])
def test_minmax_merge_of_halves_equals_whole(batches: list[np.ndarray], spec: QuantSpec) -> None:
    whole, first, second = MinMaxObserver(spec), MinMaxObserver(spec), MinMaxObserver(spec)
    for index, batch in enumerate(batches):
        whole.update(batch)
        (first if index % 2 else second).update(batch)
    merged = first.merge(second)
    for merged_bound, whole_bound in zip(merged.compute_range(), whole.compute_range()):
        np.testing.assert_array_equal(merged_bound, whole_bound)
    assert merged.count == whole.count
    assert first.merge(MinMaxObserver(spec)).compute_range()[0] is not None


def test_minmax_ignores_non_finite() -> None:
    observer = MinMaxObserver()
    observer.update(np.array([np.nan, np.inf, -np.inf], dtype=np.float32))
    assert observer.compute_range() == (0.0, 0.0) and observer.count == 0
    observer.update(np.array([1.0, np.nan, -2.0, np.inf, -np.inf], dtype=np.float32))
    assert observer.compute_range() == (-2.0, 1.0) and observer.count == 2


def test_minmax_per_channel_ignores_non_finite_and_empty_channels() -> None:
    observer = MinMaxObserver(QuantSpec.int8(axis=0))
    observer.update(np.array([[1.0, np.nan, -3.0], [np.inf, np.nan, -np.inf]], dtype=np.float32))
    low, high = observer.compute_range()
    np.testing.assert_array_equal(low, [-3.0, 0.0])
    np.testing.assert_array_equal(high, [1.0, 0.0])


def test_minmax_rejects_channel_count_change_and_type_mixing() -> None:
    observer = MinMaxObserver(QuantSpec.int8(axis=0))
    observer.update(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="channels"):
        observer.update(np.zeros((4, 2)))
    with pytest.raises(TypeError):
        observer.merge(MovingAverageMinMaxObserver(QuantSpec.int8(axis=0)))
    with pytest.raises(ValueError, match="specs"):
        MinMaxObserver().merge(MinMaxObserver(QuantSpec.uint8()))


def test_minmax_accepts_other_dtypes() -> None:
    observer = MinMaxObserver()
    observer.update(np.array([1, -5, 3], dtype=np.int32))
    observer.update(np.array([7.5], dtype=np.float16))
    assert observer.compute_range() == (-5.0, 7.5)


def test_ema_follows_the_formula() -> None:
    observer = MovingAverageMinMaxObserver(momentum=0.75)
    observer.update(np.array([-1.0, 1.0]))
    observer.update(np.array([-5.0, 9.0]))
    assert observer.compute_range() == pytest.approx((-2.0, 3.0))  # 0.75·(-1) + 0.25·(-5), 0.75·1 + 0.25·9
    observer.update(np.array([np.nan, np.inf]))  # skipped, not a batch
    assert observer.batches == 2
    assert observer.compute_range() == pytest.approx((-2.0, 3.0))


def test_ema_damps_an_outlier_batch() -> None:
    rng = np.random.default_rng(1)
    ema, minmax = MovingAverageMinMaxObserver(momentum=0.9), MinMaxObserver()
    for index in range(20):
        batch = rng.uniform(-1, 1, 1000)
        if index == 10:
            batch[0] = 100.0
        ema.update(batch)
        minmax.update(batch)
    assert minmax.compute_range()[1] == 100.0
    assert 1.0 < ema.compute_range()[1] < 100.0 * 0.1 + 1.0


def test_ema_per_channel_and_merge() -> None:
    spec = QuantSpec.int8(axis=0)
    first, second = MovingAverageMinMaxObserver(spec), MovingAverageMinMaxObserver(spec)
    first.update(np.array([[-1.0, 1.0], [-2.0, 2.0]]))
    second.update(np.array([[-3.0, 3.0], [-4.0, 4.0]]))
    second.update(np.array([[-3.0, 3.0], [-4.0, 4.0]]))
    low, high = first.merge(second).compute_range()
    np.testing.assert_allclose(low, [-(1 + 2 * 3) / 3, -(2 + 2 * 4) / 3])
    np.testing.assert_allclose(high, -low)
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageMinMaxObserver(momentum=1.0)


@pytest.mark.parametrize(
    "observer",
    [MinMaxObserver(QuantSpec.uint8()), MinMaxObserver(QuantSpec.int8(axis=1)),
     MovingAverageMinMaxObserver(momentum=0.5), MovingAverageMinMaxObserver(QuantSpec.int8(axis=1))],
)
def test_state_round_trip_and_constant_size(observer, batches: list[np.ndarray]) -> None:
    sizes = []
    for batch in batches:
        observer.update(batch)
        sizes.append(_state_size(observer.state_dict()))
    assert len(set(sizes)) == 1
    rebuilt = observer_from_state(observer.state_dict())
    assert type(rebuilt) is type(observer) and rebuilt.spec == observer.spec
    for rebuilt_bound, bound in zip(rebuilt.compute_range(), observer.compute_range()):
        np.testing.assert_array_equal(rebuilt_bound, bound)


def _state_size(state: dict) -> int:
    return sum(value.nbytes if isinstance(value, np.ndarray) else 8 for value in state.values())

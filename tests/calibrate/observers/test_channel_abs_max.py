"""ChannelAbsMaxObserver: per-channel max |x| over batches of any length, mergeable, order-free."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.calibrate.observers.channel_abs_max import ChannelAbsMaxObserver
from qgraph.errors import DataError


def test_streams_batches_of_different_lengths_and_ignores_non_finite_values():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, length, 6)) for length in (3, 7, 5)]
    batches[1][0, 0, 2] = np.inf
    batches[2][1, 1, 4] = -50.0
    observer = ChannelAbsMaxObserver()
    for batch in batches:
        observer.update(batch)
    finite = [np.where(np.isfinite(batch), batch, 0.0) for batch in batches]
    expected = np.max([np.abs(batch).reshape(-1, 6).max(axis=0) for batch in finite], axis=0)
    np.testing.assert_allclose(observer.channel_abs_max(), expected, rtol=1e-6)
    assert observer.channel_abs_max()[4] == pytest.approx(50.0)


def test_merge_equals_one_pass_and_state_round_trips():
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((4, 8)) * scale for scale in (1, 3, 0.5, 2)]
    whole, first, second = ChannelAbsMaxObserver(), ChannelAbsMaxObserver(), ChannelAbsMaxObserver()
    for index, batch in enumerate(batches):
        whole.update(batch)
        (first if index % 2 else second).update(batch)
    np.testing.assert_array_equal(first.merge(second).channel_abs_max(), whole.channel_abs_max())
    restored = ChannelAbsMaxObserver.from_state(whole.state_dict())
    np.testing.assert_array_equal(restored.channel_abs_max(), whole.channel_abs_max())


def test_bad_input_is_refused_clearly():
    observer = ChannelAbsMaxObserver()
    with pytest.raises(DataError, match="no batch"):
        observer.channel_abs_max()
    observer.update(np.ones((2, 3)))
    with pytest.raises(DataError, match="channel count"):
        observer.update(np.ones((2, 4)))
    with pytest.raises(DataError, match="scalar"):
        observer.update(np.float32(1.0))

"""Per-channel absolute maximum: the statistic SmoothQuant needs, streamed like the range observers.

For a tensor ``X`` whose channels lie on ``axis`` (the last one for a MatMul input), the state after batches
``X⁽¹⁾ … X⁽ᵗ⁾`` is one value per channel::

    a_j = max_t max_{every index i with i_axis = j} |X⁽ᵗ⁾_i|        (finite values only)

Its size is the channel count, independent of the number of batches; two observers of disjoint batches merge by an
element-wise maximum, so the result does not depend on how the batches were split or ordered. Batches may differ
in every dimension except the channel axis (a dynamic sequence length). Non-finite values are ignored, as by the
other observers; a channel that never saw a finite value reports 0.
"""

from __future__ import annotations

import logging

import numpy as np

from qgraph.calibrate.observers.base import as_float_array
from qgraph.errors import DataError

logger = logging.getLogger(__name__)


class ChannelAbsMaxObserver:
    """max |x| per channel on ``axis``, over every batch seen."""

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis
        self.state: np.ndarray | None = None
        self.batches = 0

    def update(self, batch) -> None:
        array = as_float_array(batch)
        if array.ndim == 0:
            raise DataError("a per-channel statistic needs a tensor with a channel axis, got a scalar")
        magnitudes = np.abs(np.moveaxis(array, self.axis, -1).reshape(-1, array.shape[self.axis]))
        if magnitudes.size and not np.all(np.isfinite(magnitudes)):
            magnitudes = np.where(np.isfinite(magnitudes), magnitudes, 0.0)
        largest = magnitudes.max(axis=0, initial=0.0).astype(np.float64)
        if self.state is not None and self.state.shape != largest.shape:
            raise DataError(f"channel count changed between batches: {self.state.size} then {largest.size}")
        self.state = largest if self.state is None else np.maximum(self.state, largest)
        self.batches += 1

    def merge(self, other: ChannelAbsMaxObserver) -> ChannelAbsMaxObserver:
        merged = ChannelAbsMaxObserver(self.axis)
        states = [state for state in (self.state, other.state) if state is not None]
        if len(states) == 2 and states[0].shape != states[1].shape:
            raise DataError(f"cannot merge statistics of {states[0].size} and {states[1].size} channels")
        merged.state = np.maximum(*states) if len(states) == 2 else (states[0].copy() if states else None)
        merged.batches = self.batches + other.batches
        return merged

    def channel_abs_max(self) -> np.ndarray:
        if self.state is None:
            raise DataError("no batch reached this per-channel observer")
        return self.state.astype(np.float32)

    def state_dict(self) -> dict:
        return {"axis": self.axis, "state": None if self.state is None else self.state.copy(), "batches": self.batches}

    @classmethod
    def from_state(cls, state: dict) -> ChannelAbsMaxObserver:
        observer = cls(int(state["axis"]))
        observer.state = None if state["state"] is None else np.asarray(state["state"], np.float64)
        observer.batches = int(state["batches"])
        return observer

"""Moving-average min-max observer: an exponential moving average (EMA) of per-batch minima and maxima.

With ``momentum`` m (the weight kept by the old value) and per-batch extremes ``b_min``, ``b_max``::

    first batch:  minimum = b_min,                       maximum = b_max
    later:        minimum = m · minimum + (1 - m) · b_min, maximum = m · maximum + (1 - m) · b_max

so a single outlier batch moves the range by only (1 - m) of its excess — the usual remedy when min-max is dominated
by rare extremes. Batches without any finite value are skipped (they do not count as a batch). Per channel when
``spec.axis`` is set.

The EMA depends on batch order, so ``merge`` is an approximation: it averages the two estimates weighted by the number
of batches each saw, ``(n₁·e₁ + n₂·e₂) / (n₁ + n₂)``, which is exact when both halves saw identical statistics.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from qgraph.calibrate.observers.base import (
    Observer,
    as_float_array,
    batch_min_max,
    check_state_kind,
    spec_from_state,
    spec_to_state,
)
from qgraph.quant.spec import QuantSpec

logger = logging.getLogger(__name__)

DEFAULT_MOMENTUM = 0.9


class MovingAverageMinMaxObserver(Observer):
    """EMA of batch minima and maxima; ``momentum`` in [0, 1) is the weight of the running value."""

    kind = "ema"

    def __init__(self, spec: QuantSpec | None = None, *, momentum: float = DEFAULT_MOMENTUM) -> None:
        super().__init__(spec)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.minimum: Any = None
        self.maximum: Any = None
        self.batches = 0

    def update(self, array: Any) -> None:
        low_value, high_value, count = batch_min_max(as_float_array(array), self.spec.axis, self.minimum)
        if count == 0:
            return
        if self.spec.axis is None:
            low_value, high_value = np.float64(low_value), np.float64(high_value)
        else:
            # A channel without finite values in this batch keeps its running value.
            empty = low_value > high_value
            if empty.any():
                if self.minimum is None:
                    low_value = np.where(empty, 0.0, low_value)
                    high_value = np.where(empty, 0.0, high_value)
                else:
                    low_value = np.where(empty, self.minimum, low_value)
                    high_value = np.where(empty, self.maximum, high_value)
        self._fold(low_value, high_value)

    def _fold(self, low_value: Any, high_value: Any) -> None:
        if self.minimum is None:
            self.minimum, self.maximum = low_value, high_value
        else:
            keep = self.momentum
            self.minimum = keep * self.minimum + (1.0 - keep) * low_value
            self.maximum = keep * self.maximum + (1.0 - keep) * high_value
        self.batches += 1

    def compute_range(self) -> tuple[Any, Any]:
        if self.minimum is None:
            if self.spec.axis is not None:
                raise ValueError("per-channel observer has seen no batch, so the number of channels is unknown")
            return 0.0, 0.0
        if self.spec.axis is None:
            return float(self.minimum), float(self.maximum)
        return np.array(self.minimum, dtype=np.float64), np.array(self.maximum, dtype=np.float64)

    def merge(self, other: MovingAverageMinMaxObserver) -> MovingAverageMinMaxObserver:
        self._check_mergeable(other)
        if other.momentum != self.momentum:
            raise ValueError(f"cannot merge EMA observers with momenta {self.momentum} and {other.momentum}")
        merged = MovingAverageMinMaxObserver(self.spec, momentum=self.momentum)
        states = [observer for observer in (self, other) if observer.minimum is not None]
        if not states:
            return merged
        total = sum(observer.batches for observer in states)
        merged.minimum = sum(observer.batches * observer.minimum for observer in states) / total
        merged.maximum = sum(observer.batches * observer.maximum for observer in states) / total
        merged.batches = total
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {
            "observer": self.kind,
            "spec": spec_to_state(self.spec),
            "momentum": self.momentum,
            "minimum": None if self.minimum is None else np.array(self.minimum, dtype=np.float64),
            "maximum": None if self.maximum is None else np.array(self.maximum, dtype=np.float64),
            "batches": self.batches,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MovingAverageMinMaxObserver:
        check_state_kind(state, cls.kind)
        observer = cls(spec_from_state(state["spec"]), momentum=float(state["momentum"]))
        observer.batches = int(state["batches"])
        if state["minimum"] is not None:
            observer.minimum = np.array(state["minimum"], dtype=np.float64)
            observer.maximum = np.array(state["maximum"], dtype=np.float64)
            if observer.spec.axis is None:
                observer.minimum, observer.maximum = observer.minimum[()], observer.maximum[()]
        return observer

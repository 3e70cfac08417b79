"""Min-max observers: the exact range of every finite value seen, per tensor or per channel.

State: the running minimum and maximum (scalars, or one per channel along ``spec.axis``) and the number of finite
values seen. ``update`` folds ``min``/``max`` of the batch in; ``merge`` takes the minimum of minima and the maximum of
maxima, so a merge of two halves equals the observer of the whole exactly. Channels (or tensors) that never saw a
finite value report (0, 0).

This is the default for weights (per channel along the output-channel axis) and the cheapest choice for activations;
it is sensitive to outliers, which the histogram observers address.
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
    empty_to_zero,
    spec_from_state,
    spec_to_state,
)
from qgraph.quant.spec import QuantSpec

logger = logging.getLogger(__name__)


class MinMaxObserver(Observer):
    """Running minimum and maximum; per channel when ``spec.axis`` is set."""

    kind = "minmax"

    def __init__(self, spec: QuantSpec | None = None) -> None:
        super().__init__(spec)
        self.minimum: Any = None  # float per tensor, (channels,) float64 array per channel; None before data
        self.maximum: Any = None
        self.count = 0

    def update(self, array: Any) -> None:
        low, high, count = batch_min_max(as_float_array(array), self.spec.axis, self.minimum)
        if self.spec.axis is None:
            if count == 0:
                return
            self.minimum = low if self.minimum is None else min(self.minimum, low)
            self.maximum = high if self.maximum is None else max(self.maximum, high)
        elif self.minimum is None:
            self.minimum, self.maximum = low, high
        else:
            self.minimum = np.minimum(self.minimum, low)
            self.maximum = np.maximum(self.maximum, high)
        self.count += count

    def compute_range(self) -> tuple[Any, Any]:
        if self.minimum is None:
            if self.spec.axis is not None:
                raise ValueError("per-channel observer has seen no batch, so the number of channels is unknown")
            return 0.0, 0.0
        return empty_to_zero(self.minimum, self.maximum)

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        self._check_mergeable(other)
        merged = MinMaxObserver(self.spec)
        merged.count = self.count + other.count
        states = [observer for observer in (self, other) if observer.minimum is not None]
        if not states:
            return merged
        if self.spec.axis is None:
            merged.minimum = min(observer.minimum for observer in states)
            merged.maximum = max(observer.maximum for observer in states)
        else:
            shapes = {observer.minimum.shape for observer in states}
            if len(shapes) > 1:
                raise ValueError(f"cannot merge per-channel observers with different channel counts: {shapes}")
            merged.minimum = np.minimum.reduce([observer.minimum for observer in states])
            merged.maximum = np.maximum.reduce([observer.maximum for observer in states])
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {
            "observer": self.kind,
            "spec": spec_to_state(self.spec),
            "minimum": None if self.minimum is None else np.array(self.minimum, dtype=np.float64),
            "maximum": None if self.maximum is None else np.array(self.maximum, dtype=np.float64),
            "count": self.count,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MinMaxObserver:
        check_state_kind(state, cls.kind)
        observer = cls(spec_from_state(state["spec"]))
        observer.count = int(state["count"])
        if state["minimum"] is not None:
            minimum = np.array(state["minimum"], dtype=np.float64)
            maximum = np.array(state["maximum"], dtype=np.float64)
            if observer.spec.axis is None:
                observer.minimum, observer.maximum = float(minimum), float(maximum)
            else:
                observer.minimum, observer.maximum = minimum, maximum
        return observer

"""Observer construction by method name, and reconstruction from a saved state.

``create_observer(method, spec, **options)``:

==============  =====================================================================================
method          observer
==============  =====================================================================================
``minmax``      :class:`MinMaxObserver` (per channel when ``spec.axis`` is set)
``ema``         :class:`MovingAverageMinMaxObserver` (option ``momentum``)
``entropy``     :class:`HistogramObserver` with KL calibration (options ``bins``)
``percentile``  :class:`HistogramObserver` (options ``bins``, ``percentile``)
``mse``         :class:`HistogramObserver` per tensor (options ``bins``, ``mse_candidates``), or
                :class:`PerChannelMSEWeightObserver` when ``spec.axis`` is set (``candidates``, ``min_fraction``)
==============  =====================================================================================

Unknown names and unsupported combinations (entropy or percentile per channel) raise :class:`ValueError`.
"""

from __future__ import annotations

import logging
from typing import Any

from qgraph.calibrate.observers.base import Observer
from qgraph.calibrate.observers.histogram import HistogramObserver
from qgraph.calibrate.observers.minmax import MinMaxObserver
from qgraph.calibrate.observers.moving_average import MovingAverageMinMaxObserver
from qgraph.calibrate.observers.weight import PerChannelMSEWeightObserver
from qgraph.quant.spec import QuantSpec

logger = logging.getLogger(__name__)

OBSERVER_METHODS = ("minmax", "ema", "entropy", "percentile", "mse")

_OBSERVER_TYPES: dict[str, type[Observer]] = {
    observer_type.kind: observer_type
    for observer_type in (MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver, PerChannelMSEWeightObserver)
}


def create_observer(method: str, spec: QuantSpec, **options: Any) -> Observer:
    """A fresh observer computing ranges by ``method`` for tensors quantized as ``spec``."""
    if method not in OBSERVER_METHODS:
        raise ValueError(f"unknown observer method {method!r}; valid methods: {', '.join(OBSERVER_METHODS)}")
    if method == "minmax":
        return MinMaxObserver(spec, **options)
    if method == "ema":
        return MovingAverageMinMaxObserver(spec, **options)
    if method == "mse" and spec.axis is not None:
        return PerChannelMSEWeightObserver(spec, **options)
    if spec.axis is not None:
        raise ValueError(
            f"observer method {method!r} is per tensor only; per-channel specs (axis={spec.axis}) support "
            "'minmax', 'ema' and 'mse'"
        )
    return HistogramObserver(spec, method=method, **options)


def observer_from_state(state: dict[str, Any]) -> Observer:
    """Rebuild any observer from its ``state_dict()``."""
    kind = state.get("observer")
    if kind not in _OBSERVER_TYPES:
        raise ValueError(f"unknown observer kind {kind!r} in state; known: {', '.join(sorted(_OBSERVER_TYPES))}")
    return _OBSERVER_TYPES[kind].from_state(state)

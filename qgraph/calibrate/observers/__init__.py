"""Numpy observers: small, mergeable calibration state from which quantization ranges are derived.

One module per family: :mod:`.minmax`, :mod:`.moving_average`, :mod:`.histogram` (with the range derivations in
:mod:`.histogram_ranges`), :mod:`.weight`; :mod:`.factory` builds them by method name.
"""

from qgraph.calibrate.observers.base import Observer
from qgraph.calibrate.observers.factory import OBSERVER_METHODS, create_observer, observer_from_state
from qgraph.calibrate.observers.histogram import HistogramObserver
from qgraph.calibrate.observers.minmax import MinMaxObserver
from qgraph.calibrate.observers.moving_average import MovingAverageMinMaxObserver
from qgraph.calibrate.observers.weight import PerChannelMSEWeightObserver, mse_weight_range

__all__ = [
    "OBSERVER_METHODS",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PerChannelMSEWeightObserver",
    "create_observer",
    "mse_weight_range",
    "observer_from_state",
]

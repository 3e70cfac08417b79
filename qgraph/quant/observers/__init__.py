"""Numpy observers: small, mergeable calibration state from which quantization ranges are derived.

One module per family: :mod:`.minmax`, :mod:`.moving_average`, :mod:`.histogram` (with the range derivations in
:mod:`.histogram_ranges`), :mod:`.weight`; :mod:`.factory` builds them by method name.
"""

from qgraph.quant.observers.base import Observer
from qgraph.quant.observers.factory import OBSERVER_METHODS, create_observer, observer_from_state
from qgraph.quant.observers.histogram import HistogramObserver
from qgraph.quant.observers.minmax import MinMaxObserver
from qgraph.quant.observers.moving_average import MovingAverageMinMaxObserver
from qgraph.quant.observers.weight import PerChannelMSEWeightObserver, mse_weight_range

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

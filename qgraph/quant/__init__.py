"""Quantization specs, numpy numerics references and calibration observers."""

from qgraph.quant.numerics import dequantize, fake_quantize, quantization_step, quantize, sqnr_db
from qgraph.quant.observers import (
    OBSERVER_METHODS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    PerChannelMSEWeightObserver,
    create_observer,
    observer_from_state,
)
from qgraph.quant.spec import MINIMUM_SCALE, QuantParams, QuantSpec, compute_quant_params

__all__ = [
    "MINIMUM_SCALE",
    "OBSERVER_METHODS",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PerChannelMSEWeightObserver",
    "QuantParams",
    "QuantSpec",
    "compute_quant_params",
    "create_observer",
    "dequantize",
    "fake_quantize",
    "observer_from_state",
    "quantization_step",
    "quantize",
    "sqnr_db",
]

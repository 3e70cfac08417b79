"""The quantization data model: specs and parameters, the plan annotate writes, and the numpy numerics references.

Nothing here runs a model or edits a graph; every stage above (annotate, calibrate, the passes, QAT) reads and writes
these types. Calibration observers live with calibration, in :mod:`qgraph.calibrate.observers`.
"""

from qgraph.quant.numerics import dequantize, fake_quantize, quantization_step, quantize, sqnr_db
from qgraph.quant.spec import MINIMUM_SCALE, QuantParams, QuantSpec, compute_quant_params

__all__ = [
    "MINIMUM_SCALE",
    "QuantParams",
    "QuantSpec",
    "compute_quant_params",
    "dequantize",
    "fake_quantize",
    "quantization_step",
    "quantize",
    "sqnr_db",
]

"""CALIBRATE: streaming the user's batches through one onnxruntime probe session into small, mergeable observers.

- :mod:`.driver`: ``calibrate()``, the one entry: builds the probe, runs the batches, returns ranges per tensor;
- :mod:`.probes`: the probe model (every annotated tensor as an output, If branches as standalone models);
- :mod:`.observers`: min-max, moving-average, histogram (entropy, percentile, MSE) and weight observers;
- the one optional fast path behind the probe, :mod:`.blocked_outputs` (convolution outputs read in onnxruntime's
  NCHWc layout, without reorders).
"""

from qgraph.calibrate.driver import CalibrationConfig, CalibrationResult, calibrate

__all__ = ["CalibrationConfig", "CalibrationResult", "calibrate"]

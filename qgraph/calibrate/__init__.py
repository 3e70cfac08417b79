"""CALIBRATE: streaming the user's batches through one onnxruntime probe session into small, mergeable observers.

- :mod:`.driver`: ``calibrate()``, the one entry: builds the probe, runs the batches, returns ranges per tensor;
- :mod:`.probes`: the probe model (every annotated tensor as an output, If branches as standalone models);
- :mod:`.observers`: min-max, moving-average, histogram (entropy, percentile, MSE) and weight observers;
- the optional fast paths behind the probe: :mod:`.observe_kernel` (observation inside the run, a custom operator),
  :mod:`.blocked_outputs` (convolution outputs read in onnxruntime's NCHWc layout), :mod:`.probe_edit` (the saved
  probe patched in place).
"""

from qgraph.calibrate.driver import CalibrationConfig, CalibrationResult, calibrate

__all__ = ["CalibrationConfig", "CalibrationResult", "calibrate"]

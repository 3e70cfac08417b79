"""Calibration's observers run on several threads: the ranges must not depend on how many."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.calibrate import CalibrationConfig, _observe_in_parallel, calibrate, observer_threads
from qgraph.quant.annotate import annotate
from qgraph.targets import get_target
from tests.ptq.small_models import calibration_batches, residual_cnn


@pytest.mark.parametrize("method", ["minmax", "ema", "entropy", "percentile", "mse"])
def test_ranges_are_the_same_with_one_or_three_observer_threads(method):
    model = ir.serde.deserialize_model(residual_cnn())
    plan = annotate(model, get_target("ort-cpu").rules())
    results = [
        calibrate(model, plan, calibration_batches(count=5), CalibrationConfig(method=method, threads=threads))
        for threads in (1, 3)
    ]
    assert results[0].samples == results[1].samples == 40
    assert results[0].ranges == results[1].ranges
    assert len(results[0].ranges) >= 6


def test_an_observer_error_reaches_the_caller():
    class Broken:
        def update(self, array):
            raise ValueError("observer broke")

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        with pytest.raises(ValueError, match="observer broke"):
            _observe_in_parallel(executor, 2, {"a": Broken(), "b": Broken()},
                                 [("a", np.zeros(4)), ("b", np.zeros(8))])


def test_observer_threads_default_to_the_cpu_count():
    assert observer_threads(3) == 3
    assert observer_threads(None) >= 1
    assert observer_threads(0) == 1

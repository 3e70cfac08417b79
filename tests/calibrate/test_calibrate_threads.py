"""Calibration's observers run on several threads: the ranges must not depend on how many."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.annotate.annotator import annotate
from qgraph.calibrate.driver import CalibrationConfig, _observe_in_parallel, calibrate, observer_threads
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


def _layout_chain_model():
    """MatMul → Reshape → Transpose → Flatten → MatMul: the layout outputs hold the first MatMul's values."""
    from onnx import TensorProto, helper, numpy_helper

    generator = np.random.default_rng(2)
    weight = numpy_helper.from_array(generator.standard_normal((8, 12)).astype(np.float32), "w1")
    weight2 = numpy_helper.from_array(generator.standard_normal((12, 3)).astype(np.float32), "w2")
    shape = numpy_helper.from_array(np.array([-1, 3, 4], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1], name="transpose"),
        helper.make_node("Flatten", ["t"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [weight, weight2, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("method", ["ema", "entropy", "mse"])
def test_layout_outputs_take_their_source_range_exactly(method, monkeypatch):
    import qgraph.calibrate.driver as calibration

    model = ir.serde.deserialize_model(_layout_chain_model())
    plan = annotate(model, get_target("ort-cpu").rules())
    config = CalibrationConfig(method=method)
    aliases = calibration.value_aliases(model, plan, config)
    layout_outputs = {name for name in ("r", "t", "f") if name in plan.activations}
    assert layout_outputs and aliases == {name: "h" for name in layout_outputs}
    batches = [{"x": np.random.default_rng(seed).standard_normal((16, 8)).astype(np.float32)} for seed in range(4)]
    shared = calibrate(model, plan, batches, config)
    monkeypatch.setattr(calibration, "value_aliases", lambda *arguments: {})
    separate = calibrate(model, plan, batches, config)
    assert shared.ranges == separate.ranges  # observing each layout output gives the same ranges, at more cost


def test_no_alias_across_different_observers():
    """A TOML-style method override on the layout output keeps it observed on its own."""
    import dataclasses

    from qgraph.calibrate.driver import value_aliases

    model = ir.serde.deserialize_model(_layout_chain_model())
    plan = annotate(model, get_target("ort-cpu").rules())
    overridden = dataclasses.replace(plan, activation_methods={**plan.activation_methods, "t": "percentile"})
    aliases = value_aliases(model, overridden, CalibrationConfig(method="entropy"))
    assert "t" not in aliases and aliases.get("f") in (None, "t")

"""The range check (qgraph.range_check): a range search that destroys the output is caught and falls back.

The collapsing model: ``h = Relu(x · W1)`` then ``y = h · W2``. ``W1`` routes a rare but large input feature (one
sample in 25 carries 40 in feature 0, the others lie in [0, 1]) into channel 0 of ``h``, and ``W2`` reads channel 0
with a large weight, so the rare mode carries most of the output's energy: KL divergence (entropy) sees a sparse
spike far from the bulk and clips it away. The check must catch it, log a WARNING with the numbers, and write ranges
whose output SQNR is that of min-max or better. On Gaussian data (no such mode) the check measures, keeps the entropy
ranges, and nothing changes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.annotate.annotator import annotate
from qgraph.calibrate.driver import CalibrationConfig, calibrate
from qgraph.output_comparison import OutputComparison
from qgraph.ptq import QuantizeOptions, quantize
from qgraph.range_check import KEPT, MINMAX, PER_TENSOR, RangeCheck
from qgraph.report import build_report
from qgraph.targets import get_target

FEATURES = 16
HIDDEN = 16


def two_layer_model(seed: int = 0) -> onnx.ModelProto:
    generator = np.random.default_rng(seed)
    first = np.abs(generator.standard_normal((FEATURES, HIDDEN))).astype(np.float32) * 0.1
    first[0, :] = 0.0
    first[:, 0] = 0.0
    first[0, 0] = 1.0  # channel 0 of h is feature 0: the rare mode
    second = (generator.standard_normal((HIDDEN, 4)) * 0.1).astype(np.float32)
    second[0, :] = 2.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"),
         helper.make_node("Relu", ["a"], ["h"], name="relu"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="second")],
        "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def sparse_batches(count: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Features in [0, 1]; in one sample of 25, feature 0 is 40 (the sparse, important mode)."""
    generator = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = generator.uniform(0.0, 1.0, (50, FEATURES)).astype(np.float32)
        x[:, 0] = np.where(generator.uniform(size=50) < 0.04, 40.0, generator.uniform(0.0, 0.05, 50))
        x[0, 0] = 40.0  # every batch holds the mode at least once
        batches.append({"x": x})
    return batches


def gaussian_batches(count: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(seed)
    return [{"x": generator.standard_normal((50, FEATURES)).astype(np.float32)} for _ in range(count)]


def _quantize(proto: onnx.ModelProto, batches, method: str, *, range_check: bool = True, percentile: float = 99.999):
    config = CalibrationConfig(method=method, batch_size=50, range_check=range_check, percentile=percentile)
    options = QuantizeOptions(calibration=config,
                              min_sqnr=None, speed_choice=False, bias_correction="off")
    return quantize(ir.serde.deserialize_model(proto), iter(batches), options, lower=False)


def _held_out_sqnr(proto: onnx.ModelProto, result, batches) -> float:
    reference = OutputComparison(proto, batches).outputs()
    return OutputComparison(result.qdq_model, batches).sqnr(reference)


def test_entropy_collapse_is_caught_and_falls_back(caplog):
    proto = two_layer_model()
    with caplog.at_level(logging.WARNING, logger="qgraph.range_check"):
        checked = _quantize(proto, sparse_batches(), "entropy")
    unchecked = _quantize(proto, sparse_batches(), "entropy", range_check=False)
    minmax = _quantize(proto, sparse_batches(), "minmax")
    held_out = sparse_batches(4, seed=1)
    unchecked_sqnr = _held_out_sqnr(proto, unchecked, held_out)
    minmax_sqnr = _held_out_sqnr(proto, minmax, held_out)
    checked_sqnr = _held_out_sqnr(proto, checked, held_out)
    # the premise: entropy alone wrecks the output where min-max does not
    assert unchecked_sqnr < minmax_sqnr - 10.0, (unchecked_sqnr, minmax_sqnr)
    check = checked.range_check
    assert isinstance(check, RangeCheck)
    assert check.action in (PER_TENSOR, MINMAX)
    assert check.method_sqnr_db < check.minmax_sqnr_db - check.margin_db
    assert "h" in check.tensors  # the clipped tensor takes its observed extremes
    assert checked.calibration.ranges["h"][1] == pytest.approx(40.0, rel=1e-3)
    assert unchecked.calibration.ranges["h"][1] < 20.0  # what entropy chose
    assert checked_sqnr >= minmax_sqnr - 1.0, (checked_sqnr, minmax_sqnr)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings and "entropy" in warnings[0] and "min-max" in warnings[0]
    assert f"{check.method_sqnr_db:.1f} dB" in warnings[0]


def test_percentile_collapse_is_caught():
    """--percentile 99 keeps 99% of the values: the mode (a quarter of a percent of h) is clipped."""
    proto = two_layer_model()
    checked = _quantize(proto, sparse_batches(), "percentile", percentile=99.0)
    unchecked = _quantize(proto, sparse_batches(), "percentile", range_check=False, percentile=99.0)
    held_out = sparse_batches(4, seed=1)
    assert checked.range_check is not None and checked.range_check.action != KEPT
    assert _held_out_sqnr(proto, checked, held_out) > _held_out_sqnr(proto, unchecked, held_out) + 10.0


def test_a_fine_method_is_kept_unchanged():
    proto = two_layer_model()
    checked = _quantize(proto, gaussian_batches(), "entropy")
    unchecked = _quantize(proto, gaussian_batches(), "entropy", range_check=False)
    check = checked.range_check
    assert check is not None and check.action == KEPT and check.tensors == ()
    # measured (entropy's clipped Gaussian tails cost x and h more than twice min-max's error on the tensors
    # themselves), and the output says entropy is fine
    assert check.samples == 16 and check.flagged == 2
    assert check.method_sqnr_db >= check.minmax_sqnr_db - check.margin_db
    assert dict(checked.calibration.ranges) == dict(unchecked.calibration.ranges)
    assert checked.qdq_model.SerializeToString() == unchecked.qdq_model.SerializeToString()


def test_screening_keeps_ranges_that_cost_no_tensor_more_than_min_max_unmeasured(caplog):
    """MSE never chooses a range with more expected error than min-max on its tensor: nothing to measure."""
    proto = two_layer_model()
    with caplog.at_level(logging.INFO, logger="qgraph.range_check"):
        checked = _quantize(proto, gaussian_batches(), "mse")
    unchecked = _quantize(proto, gaussian_batches(), "mse", range_check=False)
    check = checked.range_check
    assert check is not None and check.action == KEPT and check.flagged == 0
    assert check.method_sqnr_db is None and check.samples == 0
    assert any("kept unmeasured" in record.getMessage() for record in caplog.records)
    assert dict(checked.calibration.ranges) == dict(unchecked.calibration.ranges)
    assert "kept unmeasured" in "\n".join(check.to_markdown())
    assert dict(checked.calibration.ranges) == dict(unchecked.calibration.ranges)
    assert checked.qdq_model.SerializeToString() == unchecked.qdq_model.SerializeToString()


def test_minmax_has_nothing_to_check():
    result = _quantize(two_layer_model(), sparse_batches(), "minmax")
    assert result.range_check is None


def test_calibration_reports_extremes_and_errors_of_histogram_tensors():
    proto = two_layer_model()
    model = ir.serde.deserialize_model(proto)
    plan = annotate(model, get_target("ort-cpu").rules())
    result = calibrate(model, plan, sparse_batches(), CalibrationConfig(method="entropy"))
    low, high = result.extremes["h"]
    assert 0.0 <= low < 0.01 and high == pytest.approx(40.0)
    method_error, minmax_error = result.range_errors["h"]
    assert method_error > 2.0 * minmax_error > 0.0  # entropy's clipped range costs the tensor itself
    plain = calibrate(model, plan, sparse_batches(), CalibrationConfig(method="minmax"))
    assert plain.extremes == {} and plain.range_errors == {}


def test_report_records_the_check():
    proto = two_layer_model()
    result = _quantize(proto, sparse_batches(), "entropy")
    report = build_report(proto, result.qdq_model, result, sparse_batches(2), latency=False, parity=False)
    assert report.range_check == result.range_check
    markdown = report.to_markdown()
    assert "## Range check (entropy)" in markdown and f"{result.range_check.minmax_sqnr_db:.1f}" in markdown
    assert '"range_check"' in report.to_json() and '"action"' in report.to_json()

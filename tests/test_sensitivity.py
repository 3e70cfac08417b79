"""Sensitivity analysis and automatic fallback (qgraph.sensitivity): which layers break the output, and back."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from qgraph import runtime, sensitivity, sensitivity_graph
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.cli import cli
from qgraph.errors import QGraphError
from qgraph.output_comparison import output_sqnr
from qgraph.ptq import QuantizeOptions, quantize
from qgraph.report import build_report
from qgraph.sensitivity import DEFAULT_MIN_SQNR_DB
from qgraph.sensitivity_graph import ENABLE_INPUT, build_switchable_model, find_layers
from qgraph.targets import TargetOptions
from tests.ptq.small_models import calibration_batches, residual_cnn
from tools.sensitivity_models import feature_batches, outlier_mlp


def _quantize(model: onnx.ModelProto, batches, *, lower: bool = True, **options):
    quantize_options = QuantizeOptions(
        target_options=TargetOptions(format="qdq", reduce_range="off"),
        calibration=CalibrationConfig(method="minmax"),
        **options,
    )
    return quantize(ir.serde.deserialize_model(model), iter(batches), quantize_options, lower=lower)


def _output_sqnr(float_model: onnx.ModelProto, quantized: ir.Model | onnx.ModelProto, batches) -> float:
    proto = ir.serde.serialize_model(quantized) if isinstance(quantized, ir.Model) else quantized
    reference = runtime.create_session(float_model)
    approximation = runtime.create_session(proto)
    expected = [reference.run(None, batch) for batch in batches]
    actual = [approximation.run(None, batch) for batch in batches]
    return output_sqnr(expected, actual)


def _weight_is_quantized(model: ir.Model, weight: str) -> bool:
    return any(node.op_type == "DequantizeLinear" and node.outputs[0].name == f"{weight}_dequantized"
               for node in model.graph)


def test_the_destructive_layer_and_only_it_falls_back_with_the_default_bound():
    model, batches = outlier_mlp(), feature_batches()
    result = _quantize(model, batches)
    analysis = result.sensitivity
    assert analysis.min_sqnr_db == DEFAULT_MIN_SQNR_DB
    assert analysis.fell_back == ("fc2",)
    assert analysis.output_sqnr_db < 3.0  # the fully quantized model's output is noise
    assert analysis.final_output_sqnr_db >= DEFAULT_MIN_SQNR_DB and analysis.bound_met
    # the search measures only the layers it has to (fc2 alone); a table (a report) measures them all
    assert [layer.node for layer in analysis.layers] == ["fc2"]
    table = _quantize(model, batches, sensitivity_table=True).sensitivity
    assert table.fell_back == ("fc2",)
    singles = {layer.node: layer for layer in table.layers}
    assert list(singles) == ["fc1", "fc2", "fc3"] and all(layer.measured for layer in table.layers)
    assert singles["fc2"].output_sqnr_db < 3.0 and singles["fc2"].fell_back
    assert singles["fc1"].output_sqnr_db > 25.0 and not singles["fc1"].fell_back
    assert singles["fc3"].output_sqnr_db > 25.0 and not singles["fc3"].fell_back
    # the plan: fc2 in FP32 with the reason, its neighbours still quantized
    assert "fc2" not in result.plan.quantized_nodes and {"fc1", "fc3"} <= set(result.plan.quantized_nodes)
    reason = result.plan.fp32_nodes["fc2"]
    assert reason.startswith(f"fell back to FP32: alone it brought output SQNR to "
                             f"{singles['fc2'].output_sqnr_db:.1f} dB")
    assert f"(bound {DEFAULT_MIN_SQNR_DB:g} dB" in reason
    assert not _weight_is_quantized(result.model, "fc2.weight")
    assert _weight_is_quantized(result.model, "fc1.weight") and _weight_is_quantized(result.model, "fc3.weight")
    # the model as written meets the bound, measured independently on other batches
    fresh = feature_batches(count=2, seed=7)
    assert _output_sqnr(model, result.model, fresh) >= DEFAULT_MIN_SQNR_DB
    retained = batches[:analysis.batches]  # the search measures on the first calibration batches it retained
    assert math.isclose(_output_sqnr(model, result.qdq_model, retained), analysis.final_output_sqnr_db, abs_tol=1e-6)


def test_lowered_model_meets_the_bound_too():
    model, batches = outlier_mlp(), feature_batches()
    options = QuantizeOptions(target_options=TargetOptions(format="qoperator", reduce_range="off"))
    result = quantize(ir.serde.deserialize_model(model), iter(batches), options)
    assert result.sensitivity.fell_back == ("fc2",)
    assert _output_sqnr(model, result.model, batches) >= DEFAULT_MIN_SQNR_DB


def test_a_hurt_but_acceptable_layer_stays_quantized_and_a_higher_bound_takes_it_too():
    # fc3's mild outlier leaves it about 16 dB alone: above the default bound, so only fc2 falls back
    model, batches = outlier_mlp(mild_outlier=20.0), feature_batches()
    default = _quantize(model, batches, sensitivity_table=True).sensitivity
    assert default.fell_back == ("fc2",)
    singles = {layer.node: layer.output_sqnr_db for layer in default.layers}
    assert DEFAULT_MIN_SQNR_DB < singles["fc3"] < 20.0 < singles["fc1"]
    assert default.final_output_sqnr_db < 20.0
    # with 20 dB, fc3 must go as well, after fc2 (most damaging first); fc1 never
    strict = _quantize(model, batches, min_sqnr=20.0)
    assert strict.sensitivity.fell_back == ("fc2", "fc3")
    assert strict.sensitivity.final_output_sqnr_db >= 20.0
    assert strict.plan.quantized_nodes == ("fc1", "relu1")


def test_a_model_that_quantizes_fine_is_unchanged_by_the_default():
    model, batches = residual_cnn(), calibration_batches()
    default = _quantize(model, batches, lower=False)
    off = _quantize(model, batches, lower=False, min_sqnr=None)
    analysis = default.sensitivity
    assert analysis.fell_back == () and analysis.bound_met
    assert analysis.output_sqnr_db == analysis.final_output_sqnr_db > 25.0
    assert analysis.layers == ()  # per-layer runs are skipped when the bound is met and no table is asked for
    assert not any(reason.startswith("fell back") for reason in default.plan.fp32_nodes.values())
    assert default.plan == off.plan
    assert default.qdq_model.SerializeToString() == off.qdq_model.SerializeToString()
    table = _quantize(model, batches, lower=False, sensitivity_table=True).sensitivity
    assert len(table.layers) == len(find_layers(ir.serde.deserialize_model(model), default.plan))
    assert all(layer.output_sqnr_db > analysis.output_sqnr_db for layer in table.layers)
    assert not any(layer.fell_back for layer in table.layers)


def test_a_model_that_meets_the_bound_is_measured_once_without_the_switchable_graph(monkeypatch):
    model, batches = residual_cnn(), calibration_batches()

    def refuse(*arguments, **keywords):
        raise AssertionError("the switchable graph was built for a model that meets the bound")

    monkeypatch.setattr(sensitivity, "build_switchable_model", refuse)
    analysis = _quantize(model, batches, lower=False).sensitivity
    assert analysis.bound_met and analysis.fell_back == () and analysis.layers == ()
    # the QDQ graph once per retained batch: the FP32 outputs came with the calibration's probe runs
    assert analysis.runs == analysis.batches
    # the fused integer kernels' SQNR is the fake-quantized graph's, within a fraction of a decibel
    result = _quantize(model, batches, lower=False)
    retained = batches[:analysis.batches]
    assert abs(_output_sqnr(model, result.qdq_model, retained) - analysis.output_sqnr_db) < 0.5
    # a bound just above what the model reaches: the full search runs (and here finds the switchable graph refused)
    with pytest.raises(AssertionError, match="switchable graph"):
        _quantize(model, batches, lower=False, min_sqnr=analysis.output_sqnr_db + 0.1)


def test_min_sqnr_off_disables_the_analysis():
    result = _quantize(outlier_mlp(), feature_batches(), min_sqnr=None)
    assert result.sensitivity is None
    assert "fc2" in result.plan.quantized_nodes
    assert _output_sqnr(outlier_mlp(), result.model, feature_batches()) < 3.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0, 1000.0, "loud"])
def test_bad_bounds_are_refused(value):
    with pytest.raises(QGraphError, match="min-sqnr"):
        QuantizeOptions(min_sqnr=value)


def test_bad_batch_count_is_refused():
    with pytest.raises(QGraphError, match="sensitivity_batches"):
        QuantizeOptions(sensitivity_batches=0)


def test_switchable_graph_is_the_qdq_model_when_enabled_and_the_float_model_when_not():
    model, batches = residual_cnn(), calibration_batches()
    result = _quantize(model, batches, lower=False, min_sqnr=None)
    float_model = ir.serde.deserialize_model(model)
    layers = find_layers(float_model, result.plan)
    # fused Relus belong to their Conv; the residual Add owns its two inputs and its output
    assert [layer.node for layer in layers][:3] == ["conv1", "pool1", "conv2"]
    assert "relu1" not in [layer.node for layer in layers]
    assert next(layer for layer in layers if layer.node == "conv1").outputs == ("r1",)
    switchable = build_switchable_model(float_model, result.plan, result.parameters, layers)
    onnx.checker.check_model(switchable, full_check=True)
    session = runtime.create_session(switchable)
    qdq = runtime.create_session(result.qdq_model)
    reference = runtime.create_session(model)
    for batch in batches[:2]:
        on = session.run(None, {**batch, ENABLE_INPUT: np.ones(len(layers), bool)})[0]
        off = session.run(None, {**batch, ENABLE_INPUT: np.zeros(len(layers), bool)})[0]
        np.testing.assert_array_equal(on, qdq.run(None, batch)[0])
        np.testing.assert_array_equal(off, reference.run(None, batch)[0])


def test_fallback_reuses_the_calibrated_ranges(monkeypatch):
    import qgraph.ptq as quantize_module

    calls = []
    original = quantize_module.calibrate

    def counting(*arguments, **keywords):
        calls.append(arguments[1].activations)
        return original(*arguments, **keywords)

    monkeypatch.setattr(quantize_module, "calibrate", counting)
    result = _quantize(outlier_mlp(mild_outlier=20.0), feature_batches(), min_sqnr=20.0)
    assert result.sensitivity.fell_back == ("fc2", "fc3")
    assert len(calls) == 1  # the fallback plans only quantize tensors that were calibrated already


def test_report_lists_the_fallback_and_the_table():
    model, batches = outlier_mlp(), feature_batches()
    result = _quantize(model, batches)
    report = build_report(model, ir.serde.serialize_model(result.model), result, batches[:2], latency=False)
    markdown = report.to_markdown()
    assert "## Sensitivity and automatic fallback (bound 10 dB)" in markdown
    assert "1 layer fell back to FP32, most damaging first: fc2." in markdown
    assert "| fc2 | Gemm |" in markdown and "| yes |" in markdown
    assert "| fc2 | fell back to FP32: alone it brought output SQNR to" in markdown
    assert '"fell_back": [' in report.to_json()


@pytest.fixture()
def mlp_files(tmp_path):
    onnx.save(outlier_mlp(), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", input=np.concatenate([batch["input"] for batch in feature_batches()]))
    return tmp_path


def test_cli_reports_how_many_layers_fell_back(mlp_files):
    runner = CliRunner()
    arguments = ["optimize", str(mlp_files / "mlp.onnx"), "-o", str(mlp_files / "out.onnx"),
                 "--calib", str(mlp_files / "calib.npz")]
    result = runner.invoke(cli, arguments + ["--min-sqnr", "30", "--report", str(mlp_files / "r.md")])
    assert result.exit_code == 0, result.output
    assert "1 layer fell back to FP32 (fc2)" in result.output and "(bound 30 dB)" in result.output
    assert "| fc2 | Gemm |" in (mlp_files / "r.md").read_text()
    off = runner.invoke(cli, arguments + ["--min-sqnr", "off"])
    assert off.exit_code == 0, off.output
    assert "fell back" not in off.output


@pytest.mark.parametrize("value", ["loud", "-3", "0", "nan", "inf", "1e9"])
def test_cli_refuses_bad_bounds(mlp_files, value):
    result = CliRunner().invoke(cli, ["optimize", str(mlp_files / "mlp.onnx"), "-o", str(mlp_files / "out.onnx"),
                                      "--calib", str(mlp_files / "calib.npz"), "--min-sqnr", value])
    assert result.exit_code == 2
    assert "--min-sqnr" in result.output


def test_cli_min_sqnr_needs_calibration_data_and_documents_the_default(mlp_files):
    runner = CliRunner()
    result = runner.invoke(cli, ["optimize", str(mlp_files / "mlp.onnx"), "-o", str(mlp_files / "out.onnx"),
                                 "--min-sqnr", "20"])
    assert result.exit_code == 2 and "--calib" in result.output
    help_text = " ".join(runner.invoke(cli, ["optimize", "--help"]).output.split())
    assert f"default {DEFAULT_MIN_SQNR_DB:g} dB" in help_text and "--min-sqnr DB|off" in help_text


@pytest.mark.parametrize("name", ["ENABLE_INPUT", "Layer", "build_qdq", "build_switchable_model", "copy_model",
                                  "find_layers"])
def test_the_switchable_graph_stays_importable_from_sensitivity(name):
    """The switchable graph moved to qgraph.sensitivity_graph; qgraph.sensitivity still hands out the same objects."""
    assert getattr(sensitivity, name) is getattr(sensitivity_graph, name)

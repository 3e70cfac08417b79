"""Accuracy-driven tuning (qgraph.tuning): the user's metric picks the configuration, cheapest first."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qgraph.cli.main import cli
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.tuning import EvaluationError, TuningOptions, command_evaluator, tune
from tests.ptq.small_models import calibration_batches, residual_cnn
from tests.tuning_files import write_tuning_files

EVAL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort

    def logits(path, x):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x})[0]

    model, reference, data = sys.argv[1:4]
    x = np.load(data)["input"]
    print("scoring", model)
    print(-1000.0 * float(np.mean((logits(model, x) - logits(reference, x)) ** 2)))
""")


@pytest.fixture()
def files(tmp_path):
    return write_tuning_files(tmp_path, EVAL_SCRIPT)


def _command(files) -> str:
    return f"{sys.executable} {files / 'score.py'} {{model}} {files / 'm.onnx'} {files / 'calib.npz'}"


def _float_nodes(path) -> set[str]:
    return {node.name for node in onnx.load(path).graph.node if node.op_type in ("Conv", "Gemm")}


def test_a_loose_bound_is_met_by_the_first_trial_and_its_recipe_replays_exactly(files):
    evaluate = command_evaluator(_command(files))
    result = tune(files / "m.onnx", files / "out.onnx", files / "calib.npz", evaluate,
                  TuningOptions(max_drop=1e6, latency_runs=3), OptimizeOptions(quantization=QuantizeOptions()))
    assert result.fp32_score == 0.0
    assert len(result.trials) == 1 and result.chosen == 0 and result.bound_met
    assert result.trials[0].configuration.method == "minmax" and result.trials[0].latency_ms > 0
    summary = json.loads(result.trials_path.read_text())
    assert summary["trials"][0]["score"] == result.trials[0].score and summary["chosen"] == 0
    replay = optimize(files / "m.onnx", files / "replay.onnx",
                      OptimizeOptions(quantization=QuantizeOptions(config=result.recipe_path)),
                      calibration_data=files / "calib.npz")
    assert replay.quantization.sensitivity is None  # the recipe turns the SQNR fallback off
    assert (files / "replay.onnx").read_bytes() == (files / "out.onnx").read_bytes()


def test_the_metric_sends_the_layer_it_cares_about_back_to_fp32_by_bisection(files):
    # a metric that only a float conv3 satisfies: SQNR-based fallback has no reason to pick that layer
    calls = []

    def evaluate(path):
        calls.append(path)
        return 1.0 if "conv3" in _float_nodes(path) or not calls[1:] else 0.5

    result = tune(files / "m.onnx", files / "out.onnx", calibration_batches(count=2), evaluate,
                  TuningOptions(max_drop=0.1, latency_runs=0), OptimizeOptions(quantization=QuantizeOptions()))
    configurations = [trial.configuration for trial in result.trials]
    assert [c.method for c in configurations[:4]] == ["minmax", "percentile", "entropy", "mse"]
    assert configurations[4].per_channel is False
    chosen = configurations[result.chosen]
    assert result.bound_met and "conv3" in chosen.fp32_layers
    assert "conv3" in _float_nodes(files / "out.onnx")
    # a search over prefixes with two points a round (a ternary bisection): at most 2 trials per round and
    # ceil(log3(layers)) rounds, so fewer trials than one per layer would take on larger models; the chosen set is the
    # smallest prefix tried that works
    fallback = [trial for trial in result.trials if trial.configuration.stage == "fallback"]
    assert 1 <= len(fallback) <= 2 * math.ceil(math.log(4, 3))
    assert all(len(trial.configuration.fp32_layers) >= len(chosen.fp32_layers) for trial in fallback
               if trial.meets_bound)
    assert all(not trial.meets_bound for trial in result.trials[:5])
    assert "conv3" in (files / "out.toml").read_text()


def test_cli_tunes_writes_an_html_report_and_fails_when_the_bound_is_missed(files):
    runner = CliRunner()
    arguments = ["optimize", str(files / "m.onnx"), "-o", str(files / "out.onnx"), "--calib", str(files / "calib.npz"),
                 "--eval", _command(files)]
    result = runner.invoke(cli, arguments + ["--max-drop", "1000", "--report", str(files / "r.html")])
    assert result.exit_code == 0, result.output
    assert "tuning: 1 trials" in result.output and "* #0 method=minmax" in result.output
    assert 'data-plot="tuning"' in (files / "r.html").read_text()
    missed = runner.invoke(cli, arguments + ["--max-drop", "0", "--tune-budget", "2"])
    assert missed.exit_code == 2
    assert "no configuration in 2 trials met the bound" in missed.output and "beyond the allowed drop" in missed.output
    assert len(json.loads((files / "out.trials.json").read_text())["trials"]) == 2
    assert (files / "out.onnx").exists()


@pytest.mark.parametrize("code, message", [
    ("import sys; print('loading'); sys.exit(3)", "failed with exit status 3"),
    ("print('accuracy is good')", "printed no score"),
    ("print('nan')", "NaN"),
])
def test_bad_evaluation_commands_are_refused_before_any_search(files, code, message):
    command = f"{sys.executable} -c \"{code}\" {{model}}"
    result = CliRunner().invoke(cli, ["optimize", str(files / "m.onnx"), "-o", str(files / "out.onnx"),
                                      "--calib", str(files / "calib.npz"), "--eval", command, "--max-drop", "1"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and not (files / "out.onnx").exists()
    if message != "NaN":
        assert "its last lines" in result.output


def test_bad_tuning_arguments():
    with pytest.raises(Exception, match="max-drop"):
        TuningOptions(max_drop=float("nan"))
    with pytest.raises(EvaluationError, match="must contain"):
        command_evaluator("python score.py")
    result = CliRunner().invoke(cli, ["optimize", "m.onnx", "-o", "o.onnx", "--calib", "c.npz", "--max-drop", "1"])
    assert result.exit_code != 0 and "--eval" in result.output


@pytest.mark.parametrize("text, message", [
    ('[quantization]\nmethod = "best"\n', "method must be one of"),
    ('[quantization]\nper_channel = "yes"\n', "per_channel must be true or false"),
    ('[quantization]\nmin_sqnr = 0\n', "min_sqnr must be a bound"),
    ('[quantization]\nbits = 4\n', "unknown setting 'bits'"),
    ('quantization = 3\n', "must be a table"),
])
def test_bad_recipe_settings_are_refused(tmp_path, text, message):
    from qgraph.annotate.config_file import ConfigError, load_quantization_settings

    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_quantization_settings(tmp_path / "r.toml")


def test_recipe_settings_override_the_options(tmp_path):
    from qgraph.pipeline import with_config_settings

    (tmp_path / "r.toml").write_text('[quantization]\nmethod = "entropy"\nper_channel = false\nmin_sqnr = 25\n')
    options = with_config_settings(QuantizeOptions(config=tmp_path / "r.toml"))
    assert options.calibration.method == "entropy" and options.target_options.per_channel is False
    assert options.min_sqnr == 25.0
    onnx.save(residual_cnn(), tmp_path / "m.onnx")
    options = OptimizeOptions(quantization=QuantizeOptions(config=tmp_path / "r.toml"))
    result = optimize(tmp_path / "m.onnx", None, options, calibration_data=calibration_batches(count=2))
    assert all(np.ndim(result.quantization.parameters[weight.name].scale) == 0
               for weight in result.quantization.plan.weights if weight.name.endswith("weight"))


def test_a_missing_output_folder_is_refused_before_scoring(files):
    calls = []
    with pytest.raises(Exception, match="output folder does not exist"):
        tune(files / "m.onnx", files / "missing" / "out.onnx", calibration_batches(count=1),
             lambda path: calls.append(path) or 1.0, TuningOptions(max_drop=1))
    assert calls == []

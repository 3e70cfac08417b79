"""``qgraph optimize --fix-input`` and ``--quantize-recurrent`` as a user meets them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qgraph.cli import cli
from qgraph.quant.numerics import sqnr_db
from qgraph.testing import run_model
from tests.controlflow.models import speech_batches, speech_model


@pytest.fixture()
def files(tmp_path):
    model_path = tmp_path / "speech.onnx"
    onnx.save(speech_model(), model_path)
    calib_path = tmp_path / "calib.npz"
    np.savez(calib_path, audio=np.concatenate([batch["audio"] for batch in speech_batches(4)]))
    return model_path, calib_path, tmp_path


def test_fix_input_folds_the_if_without_quantizing(files):
    model_path, _, folder = files
    output = folder / "folded.onnx"
    result = CliRunner().invoke(cli, ["optimize", str(model_path), "-o", str(output), "--fix-input",
                                      "sample_rate=16000"])
    assert result.exit_code == 0, result.output
    proto = onnx.load(output)
    assert "If" not in [node.op_type for node in proto.graph.node]
    assert [value.name for value in proto.graph.input] == ["audio"]
    audio = speech_batches(1)[0]["audio"]
    expected = run_model(speech_model(), {"audio": audio, "sample_rate": np.array(16000)})["logits"]
    np.testing.assert_allclose(run_model(proto, {"audio": audio})["logits"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recurrent, lstm_op", [("fp32", "LSTM"), ("dynamic", "DynamicQuantizeLSTM")])
def test_quantize_with_a_fixed_input_and_recurrent_choice(files, recurrent, lstm_op):
    model_path, calib, folder = files
    output = folder / "quantized.onnx"
    report = folder / "report.json"
    result = CliRunner().invoke(cli, [
        "optimize", str(model_path), "-o", str(output), "--calib", str(calib),
        "--fix-input", "sample_rate=8000", "--quantize-recurrent", recurrent, "--report", str(report),
    ])
    assert result.exit_code == 0, result.output
    proto = onnx.load(output)
    types = [node.op_type for node in proto.graph.node]
    assert "If" not in types and lstm_op in types and "QLinearConv" in types
    fp32_nodes = json.loads(report.read_text())["fp32_nodes"]
    if recurrent == "fp32":
        assert "recurrent layers stay FP32 by default" in fp32_nodes["lstm"]
    else:
        assert "lstm" not in fp32_nodes
    audio = speech_batches(1, batch=6, seed=5)[0]["audio"]
    expected = run_model(speech_model(), {"audio": audio, "sample_rate": np.array(8000)})["logits"]
    assert sqnr_db(expected, run_model(proto, {"audio": audio})["logits"]) >= 25.0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--fix-input", "rate=16000"], "qgraph: error: --fix-input rate: the model has no input named 'rate' "
                                        "(its inputs: audio, sample_rate)"),
        (["--fix-input", "sample_rate=16k"], "qgraph: error: --fix-input sample_rate: '16k' is not a int64 value"),
        (["--fix-input", "sample_rate=1.5"], "qgraph: error: --fix-input sample_rate: '1.5' is not a int64 value"),
        (["--fix-input", "sample_rate=8000,16000"], "qgraph: error: --fix-input sample_rate: the input has shape () "
                                                    "(1 values), got 2 value(s)"),
        (["--fix-input", "sample_rate"], "qgraph: error: --fix-input expects NAME=VALUE"),
        (["--fix-input", "sample_rate=1", "--fix-input", "sample_rate=2"], "qgraph: error: --fix-input sample_rate "
                                                                         "is given twice (1 and 2)"),
    ],
)
def test_bad_fixed_inputs_exit_2_with_one_line(files, arguments, message):
    model_path, _, folder = files
    result = CliRunner().invoke(cli, ["optimize", str(model_path), "-o", str(folder / "out.onnx"), *arguments])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert not (folder / "out.onnx").exists()


def test_quantize_recurrent_needs_calibration_data(files):
    model_path, _, folder = files
    result = CliRunner().invoke(cli, ["optimize", str(model_path), "-o", str(folder / "out.onnx"),
                                      "--quantize-recurrent", "dynamic"])
    assert result.exit_code == 2 and "need calibration data" in result.output

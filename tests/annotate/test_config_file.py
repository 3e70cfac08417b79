"""--config: per-tensor overrides in TOML reach the quantized model, and bad files are refused in one line."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from qgraph.annotate.config_file import ConfigError
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.cli import cli
from qgraph.ptq import QuantizeOptions, quantize
from qgraph.targets import TargetOptions
from tests.ptq.small_models import calibration_batches, residual_cnn

CONFIG = """
exclude = ["conv3"]

[activation."r1"]
dtype = "int8"
method = "percentile"

[weight."conv2.weight"]
bits = 4
per_channel = false
"""


def _quantize(tmp_path, text: str):
    path = tmp_path / "overrides.toml"
    path.write_text(text)
    options = QuantizeOptions(target_options=TargetOptions(format="qdq"), config=path, min_sqnr=None,
                              calibration=CalibrationConfig(method="minmax"))
    return quantize(ir.serde.deserialize_model(residual_cnn()), calibration_batches(), options)


def test_overrides_reach_plan_parameters_and_model(tmp_path):
    result = _quantize(tmp_path, CONFIG)
    assert result.plan.fp32_nodes["conv3"] == "excluded by the user"
    assert result.parameters["r1"].spec.signed and result.parameters["r1"].zero_point.dtype == np.int8
    assert result.plan.activation_methods == {"r1": "percentile"}
    weight = result.parameters["conv2.weight"]
    assert weight.scale.shape == () and weight.spec.bits == 4  # one scale, 4-bit
    assert result.parameters["conv1.weight"].scale.shape == (8,)  # the others stay per channel
    proto = ir.serde.serialize_model(result.model)
    codes = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    quantized = next(
        value for name, value in codes.items() if name.startswith("conv2.weight") and value.dtype == np.int8
    )
    assert quantized.min() >= -8 and quantized.max() <= 7
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[activation."nope"]\ndtype = "int8"', "'nope' is not a quantized activation"),
        ('[weight."conv2.weight"]\nbits = 3', "bits must be 4 or 8"),
        ('[activation."r1"]\ncolour = "red"', "unknown setting 'colour'"),
        ('keep_fp32 = ["middle"]', "keep_fp32"),
        ("this is = not toml [", "not valid TOML"),
        ('[activation."r1"]\nmethod = "guess"', "method must be one of"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _quantize(tmp_path, text)


def test_cli_config_errors_exit_2(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(residual_cnn(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.concatenate([batch["input"] for batch in calibration_batches()]))
    config = tmp_path / "bad.toml"
    config.write_text('[weight."missing.weight"]\nbits = 4\n')
    runner = CliRunner()
    result = runner.invoke(cli, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--calib", str(calib),
                                 "--config", str(config)])
    assert result.exit_code == 2 and "'missing.weight' is not a quantized weight" in result.output
    assert not (tmp_path / "out.onnx").exists()
    good = tmp_path / "good.toml"
    good.write_text(CONFIG)
    result = runner.invoke(cli, ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--calib", str(calib),
                                 "--config", str(good)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--config", str(good)])
    assert result.exit_code == 2

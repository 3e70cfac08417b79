"""The command line as a user meets it: exit codes, messages, and the files it writes (or refuses to write)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.cli import cli


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def constant_weight_model() -> onnx.ModelProto:
    """Conv + BatchNorm + Relu whose weights all sit in Constant nodes, the way some exporters write them."""
    generator = np.random.default_rng(3)
    nodes = [
        _constant("weight", generator.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        _constant("gamma", generator.uniform(0.5, 1.5, 4).astype(np.float32)),
        _constant("beta", generator.standard_normal(4).astype(np.float32)),
        _constant("mean", generator.standard_normal(4).astype(np.float32)),
        _constant("variance", generator.uniform(0.5, 2.0, 4).astype(np.float32)),
        helper.make_node("Conv", ["input", "weight"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "variance"], ["normalized"]),
        helper.make_node("Identity", ["normalized"], ["copy"]),
        helper.make_node("Relu", ["copy"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "constant_weights",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 8, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(constant_weight_model(), path)
    return path


def test_help_teaches_the_commands(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("optimize", "inspect", "passes"):
        assert command in result.output


def test_passes_lists_every_canonical_pass(runner):
    from qgraph.pipeline import CANONICAL_PASSES

    result = runner.invoke(cli, ["passes"])
    assert result.exit_code == 0, result.output
    for name in CANONICAL_PASSES:
        assert f"*{name}" in result.output


def test_optimize_turns_constant_nodes_into_initializers_and_keeps_outputs(runner, model_path, tmp_path):
    output = tmp_path / "out.onnx"
    result = runner.invoke(cli, ["optimize", str(model_path), "-o", str(output), "--stats"])
    assert result.exit_code == 0, result.output
    assert "BatchNormalization -1" in result.output
    optimized = onnx.load(output)
    onnx.checker.check_model(optimized, full_check=True)
    op_types = [node.op_type for node in optimized.graph.node]
    assert op_types == ["Conv", "Relu"]
    assert len(optimized.graph.initializer) >= 2  # the folded weight and bias, no longer Constant nodes

    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    expected = runtime.run(runtime.create_session(constant_weight_model()), feeds)["output"]
    actual = runtime.run(runtime.create_session(optimized), feeds)["output"]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_inspect_reports_signature_operators_and_parameters(runner, model_path):
    result = runner.invoke(cli, ["inspect", str(model_path)])
    assert result.exit_code == 0, result.output
    assert "input: float [batch, 3, 8, 8]" in result.output
    assert "BatchNormalization  1" in result.output or "BatchNormalization 1" in result.output

    as_json = runner.invoke(cli, ["inspect", str(model_path), "--json"])
    summary = json.loads(as_json.output)
    assert summary["operator_counts"]["Constant"] == 5
    assert summary["opsets"] == {"ai.onnx": 17}


def test_inspect_counts_parameters_of_initializers(runner, tmp_path):
    weight = numpy_helper.from_array(np.ones((8, 4), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["output"])],
        "matmul",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    summary = json.loads(runner.invoke(cli, ["inspect", str(path), "--json"]).output)
    assert summary["parameter_count"] == 32
    assert summary["parameter_bytes"] == 128


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"this is not a model", "not an ONNX model"),
        (b"", "not an ONNX model"),
    ],
)
def test_bad_model_files_exit_2_with_one_line(runner, tmp_path, content, message):
    path = tmp_path / "broken.onnx"
    if content is not None:
        path.write_bytes(content)
    result = runner.invoke(cli, ["optimize", str(path), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_model_exits_2(runner, model_path, tmp_path):
    data = model_path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    result = runner.invoke(cli, ["inspect", str(truncated)])
    assert result.exit_code == 2
    assert "truncated" in result.output or "not an ONNX model" in result.output


def test_output_equal_to_input_is_refused_and_input_untouched(runner, model_path):
    original = model_path.read_bytes()
    result = runner.invoke(cli, ["optimize", str(model_path), "-o", str(model_path)])
    assert result.exit_code == 2
    assert "output path is the input" in result.output
    assert model_path.read_bytes() == original


def test_unknown_pass_is_a_user_error(runner, model_path, tmp_path):
    result = runner.invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--passes", "Nope"])
    assert result.exit_code == 2
    assert "unknown pass 'Nope'" in result.output


def test_unsupported_domain_is_refused(runner, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["input"], ["output"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=8
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    result = runner.invoke(cli, ["optimize", str(path), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2
    assert "com.example" in result.output and "Mystery" in result.output


def test_internal_failure_exits_1(runner, model_path, tmp_path, monkeypatch):
    import qgraph.pipeline as optimize_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(optimize_module, "optimize", broken)
    result = runner.invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 1
    assert "internal error" in result.output


def test_sparse_constant_is_refused_with_a_clear_message(runner, tmp_path):
    values = numpy_helper.from_array(np.array([1.0], np.float32), "values")
    indices = numpy_helper.from_array(np.array([2], np.int64), "indices")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["constant"], sparse_value=sparse),
         helper.make_node("Add", ["input", "constant"], ["output"])],
        "sparse",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [4])],
    )
    path = tmp_path / "sparse.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    result = runner.invoke(cli, ["optimize", str(path), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2, result.output
    assert "cannot represent" in result.output and "Sparse" in result.output
    assert "_deserialize" not in result.output


def test_missing_calibration_file_is_a_user_error(runner, model_path, tmp_path):
    result = runner.invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"),
                                 "--calib", str(tmp_path / "missing.npz")])
    assert result.exit_code == 2, result.output
    assert "missing.npz: no such file" in result.output
    assert "Traceback" not in result.output


def test_a_float16_model_is_refused_before_calibration_with_what_to_do(runner, tmp_path):
    """The Q/DQ pairs carry float32 scales: a float16 model was an 'internal error' from onnxruntime after the
    whole calibration; it is refused first, naming the type and a tensor, and nothing is written."""
    import numpy as np
    from onnx import numpy_helper

    weight = numpy_helper.from_array(np.full((4, 3), 0.5, np.float16), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="project")], "half",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["batch", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["batch", 3])], [weight])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    np.savez(tmp_path / "calib.npz", x=np.ones((8, 4), np.float16))
    result = runner.invoke(cli, ["optimize", str(path), "-o", str(tmp_path / "out.onnx"),
                                 "--calib", str(tmp_path / "calib.npz")])
    assert result.exit_code == 2, result.output
    assert "computes in float16" in result.output and "float32" in result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_a_closed_pipe_ends_quietly():
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "qgraph.cli", "passes"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before qgraph writes a line, like `qgraph passes | head -0`
    stderr = process.stderr.read().decode()
    process.wait(timeout=60)
    assert "Traceback" not in stderr and "internal error" not in stderr


@pytest.mark.parametrize("flag, shown", [("-v", True), ("-vv", True), ("", False)])
def test_verbose_shows_the_log_although_onnxruntime_configured_logging_first(model_path, tmp_path, flag, shown):
    # onnxruntime-training calls logging.basicConfig when it is imported, before the group's callback runs (click
    # imports the optimize command to resolve it): the flag must still set qgraph's level, in a fresh process
    import subprocess
    import sys

    arguments = [flag] if flag else []
    completed = subprocess.run([sys.executable, "-m", "qgraph.cli", *arguments, "optimize", str(model_path), "-o",
                                str(tmp_path / "out.onnx")], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert ("INFO qgraph.ir.load: loaded" in completed.stderr) == shown
    assert ("DEBUG qgraph." in completed.stderr) == (flag == "-vv")


@pytest.mark.parametrize("value, message", [("1.05", "below 1.1"), ("fast", "neither a number nor 'off'")])
def test_a_speed_choice_lead_out_of_range_is_a_usage_error(runner, model_path, tmp_path, value, message):
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=np.zeros((2, 3, 8, 8), np.float32))
    result = runner.invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--calib",
                                 str(calibration), "--speed-choice-lead", value])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "out.onnx").exists()


def test_the_speed_choice_lead_needs_calibration_data(runner, model_path, tmp_path):
    result = runner.invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"),
                                 "--speed-choice-lead", "off"])
    assert result.exit_code == 2 and "add --calib DATA" in result.output

"""Tuning trials and calibration shards on a real local Ray instance of 2 workers: the same choice, the same ranges
as in one process; Ray missing or an address that does not answer are clear errors."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from qgraph.annotate.annotator import annotate
from qgraph.calibrate.driver import CalibrationConfig, calibrate
from qgraph.cli.main import cli
from qgraph.pipeline import OptimizeOptions
from qgraph.ptq import QuantizeOptions
from qgraph.ray_trials import (
    LocalTrials,
    RayError,
    RayTrials,
    ShardedCalibration,
    calibrate_sharded,
    check_address,
    cpu_count,
    trial_executor,
)
from qgraph.targets import get_target
from qgraph.tuning import TuningOptions, command_evaluator, tune
from tests.ptq.small_models import calibration_batches, residual_cnn
from tests.tuning_files import write_tuning_files

# scores 1.0 only when conv3 stays a float Conv (the fallback must find it), and logs the threads it was given
SCORE_SCRIPT = textwrap.dedent("""
    import os, sys
    import onnx
    model, log = sys.argv[1:3]
    with open(log, "a") as file:
        file.write(os.environ.get("QGRAPH_THREADS", "unset") + "\\n")
    nodes = onnx.load(model).graph.node
    print(1.0 if any(node.name == "conv3" and node.op_type == "Conv" for node in nodes) else 0.5)
""")


@pytest.fixture()
def files(tmp_path):
    return write_tuning_files(tmp_path, SCORE_SCRIPT)


def _evaluator(files, log: str):
    return command_evaluator(f"{sys.executable} {files / 'score.py'} {{model}} {files / log}")


@pytest.fixture(scope="module")
def ray_module():
    """One local Ray instance of 2 workers for the module (RayTrials uses it and leaves it running)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the ray extra; the dev extra brings it)")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_two_ray_workers_choose_what_one_process_chooses(files, ray_module, monkeypatch, caplog):
    options = OptimizeOptions(quantization=QuantizeOptions())
    local = tune(files / "m.onnx", files / "local.onnx", files / "calib.npz", _evaluator(files, "local.log"),
                 TuningOptions(max_drop=0.1, latency_runs=2), options)
    with monkeypatch.context() as patch, caplog.at_level("INFO", logger="qgraph.ray_trials"):
        patch.setattr(RayTrials, "head_start", False)  # every trial on the actors, none in this process
        distributed = tune(files / "m.onnx", files / "ray.onnx", files / "calib.npz", _evaluator(files, "ray.log"),
                           TuningOptions(max_drop=0.1, latency_runs=2, workers=2), options)
    # by default the first trials run in this process while the actors start: the same search all the same
    head_start = tune(files / "m.onnx", files / "head.onnx", files / "calib.npz", _evaluator(files, "head.log"),
                      TuningOptions(max_drop=0.1, latency_runs=2, workers=2), options)
    assert local.executor == "one process" and distributed.executor == "Ray" and distributed.workers == 2
    assert local.bound_met and distributed.bound_met
    chosen = distributed.trials[distributed.chosen].configuration
    assert chosen == local.trials[local.chosen].configuration and "conv3" in chosen.fp32_layers
    # the rounds' outcomes are the same prefixes: the same trials, in the same order, with the same scores
    for other in (distributed, head_start):
        assert [t.configuration for t in other.trials] == [t.configuration for t in local.trials]
        assert [t.score for t in other.trials] == [t.score for t in local.trials]
        assert other.chosen == local.chosen
    for name in ("ray", "head"):
        assert (files / f"{name}.onnx").read_bytes() == (files / "local.onnx").read_bytes()
        assert (files / f"{name}.toml").read_text() == (files / "local.toml").read_text()
    workers = {trial.worker for trial in distributed.trials}
    assert len(workers) == 2 and f"{socket.gethostname()}:{os.getpid()}" not in workers  # both actors, not here
    # each worker's onnxruntime (and the evaluation) got cores / workers threads (all the cores in a round of one
    # trial); one process all of them
    ray_threads = (files / "ray.log").read_text().split()[1:]  # the first line is the FP32 model's score
    # (a trial started past the first that met the bound is there too: it ran, unread)
    assert len(ray_threads) >= len(distributed.trials) and str(max(1, cpu_count() // 2)) in ray_threads
    assert set(ray_threads) <= {str(max(1, cpu_count() // 2)), str(cpu_count())}
    assert set((files / "local.log").read_text().split()[1:]) == {str(cpu_count())}
    assert ray_module.is_initialized()  # an instance the search did not start is left running
    assert "shard(s) (Ray)" in caplog.text  # the fallback's sensitivity analysis calibrated on the workers


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "mse"])
def test_sharded_calibration_equals_one_process(method, ray_module):
    model = ir.serde.deserialize_model(residual_cnn())
    plan = annotate(model, get_target("ort-cpu").rules())
    config = CalibrationConfig(method=method, samples=36)
    # 5 batches of 8 cut at 36 samples: the fifth is cut, so at most 4 outputs are kept; the shards hold batches
    # [0, 2), [2, 3), [3, 5), so the kept outputs run over all three
    whole = calibrate(model, plan, calibration_batches(count=5), config, keep_outputs=5)
    local = calibrate_sharded(model, plan, calibration_batches(count=5), config, LocalTrials(), shards=3,
                              keep_outputs=5)
    executor = trial_executor(2)
    try:
        executor.start()
        assert isinstance(executor.calibrator(), ShardedCalibration)
        # what the quantization calls in place of calibrate (QuantizeOptions.calibrator)
        distributed = executor.calibrator()(model, plan, calibration_batches(count=5), config, keep_outputs=3)
    finally:
        executor.close()
    assert whole.samples == local.samples == distributed.samples == 36
    assert whole.ranges == local.ranges == distributed.ranges
    assert len(whole.ranges) >= 6
    assert len(whole.outputs) == len(local.outputs) == 4 and len(distributed.outputs) == 3
    for reference, sharded in zip(whole.outputs, [*local.outputs, *distributed.outputs]):
        assert reference.keys() == sharded.keys() and reference
        for name in reference:
            np.testing.assert_allclose(reference[name], sharded[name], rtol=1e-6, atol=1e-6)


def test_sharded_calibration_refuses_the_order_dependent_moving_average():
    model = ir.serde.deserialize_model(residual_cnn())
    plan = annotate(model, get_target("ort-cpu").rules())
    with pytest.raises(Exception, match="ema"):
        calibrate_sharded(model, plan, calibration_batches(count=2), CalibrationConfig(method="ema"))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_that_does_not_answer_is_a_clear_error(files, ray_module):
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(RayError, match="does not answer"):
        check_address(address, timeout=1.0)
    with pytest.raises(RayError, match="expected HOST:PORT"):
        check_address("no-port-here")
    result = CliRunner().invoke(cli, ["optimize", str(files / "m.onnx"), "-o", str(files / "out.onnx"), "--calib",
                                      str(files / "calib.npz"), "--eval", "echo 1 {model}", "--max-drop", "1",
                                      "--ray-address", address])
    assert result.exit_code != 0 and "does not answer" in result.output and "Traceback" not in result.output
    assert not (files / "out.onnx").exists()


def test_without_ray_an_address_is_refused_and_workers_run_in_one_process(files, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RayError, match="Ray is not installed"):
        trial_executor(2, "127.0.0.1:6379")
    result = CliRunner().invoke(cli, ["optimize", str(files / "m.onnx"), "-o", str(files / "out.onnx"), "--calib",
                                      str(files / "calib.npz"), "--eval", "echo 1 {model}", "--max-drop", "1",
                                      "--ray-address", "127.0.0.1:6379"])
    assert result.exit_code != 0 and "pip install qgraph[ray]" in result.output and "Traceback" not in result.output
    with caplog.at_level("WARNING"):
        executor = trial_executor(2)
    assert isinstance(executor, LocalTrials) and "run one after another in this process" in caplog.text


def test_cli_tune_workers_runs_the_trials_on_ray(files, ray_module):
    result = CliRunner().invoke(cli, ["optimize", str(files / "m.onnx"), "-o", str(files / "out.onnx"), "--calib",
                                      str(files / "calib.npz"), "--eval",
                                      f"{sys.executable} {files / 'score.py'} {{model}} {files / 'cli.log'}",
                                      "--max-drop", "0.1", "--tune-workers", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((files / "out.trials.json").read_text())
    assert summary["executor"] == "Ray" and summary["workers"] == 2 and summary["bound_met"]
    assert "conv3" in summary["trials"][summary["chosen"]]["fp32_layers"]
    assert str(max(1, cpu_count() // 2)) in (files / "cli.log").read_text().split()[1:]

"""The data layout wired through qgraph: samples counted along each key's batch axis in calibration and training,
``OptimizeOptions.data_layout`` and ``--batch-axis``/``--infer-state-axes`` from the command line, the keys of
inputs ``--fix-input`` removed left out, and ``--qat`` refused on recurrent models before onnxruntime-training
crashes on them."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from qgraph.annotate.annotator import annotate
from qgraph.calibrate.driver import CalibrationConfig, batch_samples, calibrate, first_samples
from qgraph.cli import cli
from qgraph.data import DataLayout, batch_axes_of, dataset_from_arrays
from qgraph.errors import DataError, UnsupportedModelError
from qgraph.models.stream_vad import STATE_NAMES, build_stream_vad, stream_feeds, synthetic_speech, write_feed_folder
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.qat.options import QATOptions
from qgraph.targets import get_target
from qgraph.train.batches import BatchChecker, checked_batches
from tests.data.context_models import context_model

SECONDS = 1.0  # 31 chunks of 512 samples at 16 kHz


def state_first_model(hidden: int = 4) -> onnx.ModelProto:
    """state [2, batch, hidden] (declared first) and input [batch, 6] → Transpose/Reshape/Concat → MatMul → output."""
    return context_model(hidden, name="state_first", state_first=True, bias=False, weight_scale=1.0)


def state_first_batches(count: int, batch: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(seed)
    return [{"state": generator.standard_normal((2, batch, 4)).astype(np.float32),
             "input": generator.standard_normal((batch, 6)).astype(np.float32)} for _ in range(count)]


# --- counting -----------------------------------------------------------------------------------------------------

def test_a_batch_counts_its_samples_along_the_first_counted_keys_axis():
    feeds = {"sr": np.array(16000), "state": np.zeros((2, 5, 4)), "input": np.zeros((5, 6))}
    assert batch_samples(feeds, {"state": 1}) == 5
    assert batch_samples(feeds) == 2  # without the layout the state's layers would be counted
    assert batch_samples({"sr": np.array(16000)}) == 1 and batch_samples({}) == 0
    cut = first_samples(feeds, 3, {"state": 1})
    assert cut["state"].shape == (2, 3, 4) and cut["input"].shape == (3, 6) and cut["sr"].shape == ()
    np.testing.assert_array_equal(cut["state"], feeds["state"][:, :3])


def test_calibration_counts_and_cuts_a_state_given_first_along_its_batch_axis():
    model = ir.serde.deserialize_model(state_first_model())
    plan = annotate(model, get_target("ort-cpu").rules())
    batches = state_first_batches(3, 8)
    config = CalibrationConfig(samples=20)
    result = calibrate(model, plan, iter(batches), config, batch_axes={"state": 1})
    assert (result.samples, result.batches) == (20, 3)
    # the same 20 samples in one batch give the same ranges: the last batch was cut along each key's own axis
    whole = {"state": np.concatenate([batch["state"] for batch in batches], axis=1)[:, :20],
             "input": np.concatenate([batch["input"] for batch in batches])[:20]}
    reference = calibrate(model, plan, iter([whole]), CalibrationConfig(), batch_axes={"state": 1})
    assert reference.samples == 20 and reference.ranges == result.ranges


def test_optimize_counts_samples_along_the_layouts_axis():
    batches = state_first_batches(1, 24)[0]
    options = OptimizeOptions(quantization=QuantizeOptions(calibration=CalibrationConfig(batch_size=8, samples=20),
                                                           min_sqnr=None, speed_choice=False),
                              data_layout=DataLayout({"state": 1}))
    result = optimize(ir.serde.deserialize_model(state_first_model()), options=options,
                      calibration_data=dataset_from_arrays(batches, layout=DataLayout({"state": 1})))
    assert (result.quantization.calibration.samples, result.quantization.calibration.batches) == (20, 3)
    # a raw iterable of batches counts along the axes the options name
    result = optimize(ir.serde.deserialize_model(state_first_model()), options=options,
                      calibration_data=state_first_batches(2, 16))
    assert (result.quantization.calibration.samples, result.quantization.calibration.batches) == (20, 2)


def test_a_dataset_keeps_its_own_layout_under_the_default_options():
    batch = state_first_batches(1, 12)[0]
    dataset = dataset_from_arrays({**batch, "sr": np.array(16000)}, layout=DataLayout({"state": 1}))
    assert DataLayout().for_dataset(dataset) == DataLayout({"state": 1})
    assert DataLayout(removed_inputs={"sr"}).for_dataset(dataset) == DataLayout({"state": 1}, removed_inputs={"sr"})
    assert DataLayout({"state": 0}).for_dataset(dataset) == DataLayout({"state": 0})
    assert batch_axes_of(dataset) == {"state": 1, "input": 0, "sr": None}


def test_training_batches_are_checked_along_each_inputs_batch_axis():
    batch = state_first_batches(1, 16)[0]
    targets = np.zeros((16, 1), np.float32)
    checker = BatchChecker(("state", "input"), loss="mse", num_classes=None)
    with pytest.raises(DataError, match=r"\(16, 1\) targets for a batch of 2 samples"):
        checker((batch, targets), 0)  # without a layout the state's layers are taken for its batch
    feeds, checked = BatchChecker(("state", "input"), loss="mse", num_classes=None,
                                  batch_axes={"state": 1})((batch, targets), 0)
    assert checked.shape == (16, 1) and feeds["state"].shape == (2, 16, 4)
    # a Dataset source is counted along its own keys' axes, whatever the checker was given
    dataset = dataset_from_arrays({**batch, "target": targets}, label_key="target", layout=DataLayout({"state": 1}))
    pairs = list(checked_batches(dataset, checker, batch_size=8, shuffle=False, seed=0, role="training"))
    assert [target.shape for _, target in pairs] == [(8, 1), (8, 1)]


@pytest.mark.qat  # trains through onnxruntime-training (or checks its refusal)
def test_qat_is_refused_on_a_recurrent_model_before_any_work():
    options = OptimizeOptions(quantization=QuantizeOptions(), qat=QATOptions(loss="distill"),
                              fixed_inputs={"sr": 16000})
    with pytest.raises(UnsupportedModelError, match=r"recurrent layers \(lstm.*LSTM\).*without --qat"):
        optimize(ir.serde.deserialize_model(build_stream_vad("LSTM")), options=options,
                 calibration_data=[{"input": np.zeros((1, 512), np.float32)}], train_data="unused.npz")


# --- the command line ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stream_folders(tmp_path_factory):
    """The LSTM and GRU stand-ins and a folder of per-sample feeds for each, exactly what the model takes."""
    root = tmp_path_factory.mktemp("stream_cli")
    made = {}
    for kind in ("LSTM", "GRU"):
        model = build_stream_vad(kind)
        onnx.save(model, root / f"{kind}.onnx")
        count = write_feed_folder(root / f"feeds_{kind}", stream_feeds(model, synthetic_speech(SECONDS)))
        made[kind] = (root / f"{kind}.onnx", root / f"feeds_{kind}", count)
    return made


@pytest.mark.speed_choice  # the default run as a user meets it: timed on the state-first feeds too
@pytest.mark.parametrize("kind, layout_options", [
    ("LSTM", ["--batch-axis", "state=1"]),
    ("GRU", ["--infer-state-axes"]),
], ids=["lstm-batch-axis", "gru-inferred"])
def test_cli_quantizes_the_stream_model_from_a_per_sample_folder(kind, layout_options, stream_folders, tmp_path,
                                                                caplog):
    model_path, folder, count = stream_folders[kind]
    output = tmp_path / "vad.int8.onnx"
    report = tmp_path / "report.md"
    with caplog.at_level(logging.INFO, logger="qgraph.data.validate"):
        result = CliRunner().invoke(cli, ["optimize", str(model_path), "-o", str(output), "--calib", str(folder),
                                          *layout_options, "--fix-input", "sr=16000", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert f"calibrated on {count} samples" in result.output
    assert "FP32 (batch 1/16)" in result.output  # the speed choice timed the first batch of 16 and one sample
    assert any("ignoring key(s) sr: no longer inputs of the model" in record.getMessage()
               for record in caplog.records)
    quantized = onnx.load(output)
    assert [value.name for value in quantized.graph.input] == ["input", STATE_NAMES[kind]]
    assert report.exists() and "faster at batch 1" in result.output


def test_cli_without_the_batch_axis_refuses_the_folder_with_a_clear_message(stream_folders, tmp_path):
    model_path, folder, _ = stream_folders["LSTM"]
    result = CliRunner().invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"),
                                      "--calib", str(folder), "--fix-input", "sr=16000"])
    assert result.exit_code != 0
    assert "state" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("arguments, message", [
    (["--batch-axis", "state"], "--batch-axis expects KEY=AXIS"),
    (["--batch-axis", "state=1", "--batch-axis", "state=2"], "--batch-axis state is given twice"),
    (["--batch-axis", "nothing=1"], "--batch-axis nothing=1 names no key of the data"),
])
def test_cli_refuses_a_bad_batch_axis(arguments, message, stream_folders, tmp_path):
    model_path, folder, _ = stream_folders["LSTM"]
    result = CliRunner().invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"),
                                      "--calib", str(folder), "--fix-input", "sr=16000", *arguments])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_cli_refuses_a_layout_without_data(stream_folders, tmp_path):
    model_path, _, _ = stream_folders["LSTM"]
    result = CliRunner().invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"),
                                      "--batch-axis", "state=1"])
    assert result.exit_code != 0 and "--calib" in result.output


@pytest.mark.qat  # trains through onnxruntime-training (or checks its refusal)
def test_cli_refuses_qat_on_the_stream_model_instead_of_crashing(stream_folders, tmp_path):
    model_path, folder, _ = stream_folders["GRU"]
    result = CliRunner().invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"),
                                      "--calib", str(folder), "--infer-state-axes", "--fix-input", "sr=16000",
                                      "--qat", "--distill", "--train-data", str(folder)])
    assert result.exit_code != 0
    assert "recurrent layers" in result.output and "without --qat" in result.output
    assert not (tmp_path / "out.onnx").exists()

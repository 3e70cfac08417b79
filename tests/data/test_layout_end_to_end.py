"""Per-sample feed folders of a streaming model with a [layers, batch, hidden] state, end to end: the real
calibrate(), optimize() with ``fixed_inputs={"sr": 16000}``, and training from a dataset batched on axis 1."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph.annotate.annotator import annotate
from qgraph.calibrate.driver import CalibrationConfig, calibrate
from qgraph.data import DataLayout, open_dataset, validate_dataset
from qgraph.models.stream_vad import STATE_NAMES, build_stream_vad, stream_feeds, synthetic_speech, write_feed_folder
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.quant.numerics import sqnr_db
from qgraph.runtime import create_session
from qgraph.targets import get_target
from qgraph.train import Trainer, TrainingConfig
from tests.data.context_models import context_model

SECONDS = 3.0  # 93 chunks of 512 samples at 16 kHz


@pytest.fixture(scope="module")
def lstm_model() -> onnx.ModelProto:
    return build_stream_vad("LSTM")


@pytest.fixture(scope="module")
def lstm_feeds(lstm_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "feeds"
    count = write_feed_folder(folder, stream_feeds(lstm_model, synthetic_speech(SECONDS)))
    return folder, count


def _held_out(model: onnx.ModelProto, state: str) -> dict[str, np.ndarray]:
    """Other audio, streamed through the FP32 model and batched along each input's batch axis (sr removed)."""
    feeds = list(stream_feeds(model, synthetic_speech(2.0, seed=11)))
    return {"input": np.concatenate([feed["input"] for feed in feeds]),
            state: np.concatenate([feed[state] for feed in feeds], axis=1)}


def test_calibrate_streams_a_per_sample_folder(lstm_model, lstm_feeds, tmp_path):
    folder, count = lstm_feeds
    model = ir.serde.deserialize_model(lstm_model)
    plan = annotate(model, get_target("ort-cpu").rules())
    dataset = validate_dataset(open_dataset(folder, layout=DataLayout({"state": 1})), lstm_model)
    assert dataset.num_samples == count and dataset.input_names == ("input", "state", "sr")
    config = CalibrationConfig(batch_size=8)
    result = calibrate(model, plan, dataset.iter_batches(8, include_labels=False), config)
    assert result.samples == count and result.batches == math.ceil(count / 8)
    assert any(tensor.startswith("front_end_16k") for tensor in result.ranges)  # the branch sr=16000 takes
    assert not any(tensor.startswith("front_end_8k") for tensor in result.ranges)
    # the same samples in one batched file give the same ranges
    batched = {"input": np.concatenate([batch["input"] for batch in dataset.iter_batches(count)]),
               "state": np.concatenate([batch["state"] for batch in dataset.iter_batches(count)], axis=1),
               "sr": np.array(16000)}
    np.savez(tmp_path / "batched.npz", **batched)
    reference = calibrate(model, plan, open_dataset(tmp_path / "batched.npz", layout=DataLayout({"state": 1}))
                          .iter_batches(8), config)
    assert reference.ranges == result.ranges


@pytest.mark.parametrize("kind, layout", [
    ("LSTM", DataLayout({"state": 1})),
    ("GRU", DataLayout(infer_state_axes=True)),
], ids=["lstm-batch-axis", "gru-inferred"])
def test_optimize_with_fixed_sample_rate(kind, layout, lstm_model, lstm_feeds, tmp_path, caplog):
    model = lstm_model if kind == "LSTM" else build_stream_vad(kind)
    state = STATE_NAMES[kind]
    if kind == "LSTM":
        folder, count = lstm_feeds
    else:
        folder = tmp_path / "feeds"
        count = write_feed_folder(folder, stream_feeds(model, synthetic_speech(SECONDS)))
    calibration = open_dataset(folder, layout=layout.with_removed_inputs(["sr"]))
    options = OptimizeOptions(quantization=QuantizeOptions(calibration=CalibrationConfig(batch_size=16)),
                              fixed_inputs={"sr": 16000})
    with caplog.at_level(logging.INFO, logger="qgraph.data.validate"):
        result = optimize(ir.serde.deserialize_model(model), tmp_path / "quantized.onnx", options,
                          calibration_data=calibration)
    ignoring = [record.getMessage() for record in caplog.records if "ignoring key(s)" in record.getMessage()]
    assert ignoring == [f"{folder}: ignoring key(s) sr: no longer inputs of the model (fixed with --fix-input)"]
    assert result.quantization.calibration.samples == count
    quantized = onnx.load(tmp_path / "quantized.onnx")
    assert [value.name for value in quantized.graph.input] == ["input", state]
    ops = {node.op_type for node in quantized.graph.node}
    assert "If" not in ops and "QLinearConv" in ops and kind in ops
    held_out = _held_out(model, state)
    expected = create_session(model).run(None, {**held_out, "sr": np.array(16000)})
    actual = create_session(quantized).run(None, held_out)
    for name, reference, approximation in zip(("output", "stateN"), expected, actual):
        assert approximation.shape == reference.shape
        assert sqnr_db(reference, approximation) > 25.0, name
    # the speech probability's variation, not only its mean, survives quantization
    centred = sqnr_db(expected[0] - expected[0].mean(), actual[0] - expected[0].mean())
    assert centred > (10.0 if kind == "LSTM" else 0.0)


def test_calibration_samples_limit_counts_along_the_batch_axis(lstm_model, lstm_feeds):
    folder, _ = lstm_feeds
    calibration = open_dataset(folder, layout=DataLayout({"state": 1}, removed_inputs={"sr"}))
    options = OptimizeOptions(quantization=QuantizeOptions(calibration=CalibrationConfig(batch_size=8, samples=20),
                                                           min_sqnr=None),
                              fixed_inputs={"sr": 16000})
    result = optimize(ir.serde.deserialize_model(lstm_model), options=options, calibration_data=calibration)
    assert result.quantization.calibration.samples == 20
    assert result.quantization.calibration.batches == 3


def _context_regressor(hidden: int = 4) -> onnx.ModelProto:
    """input [batch, 6] and state [2, batch, hidden] → Transpose/Reshape/Concat → MatMul + b → output [batch, 1]."""
    return context_model(hidden, name="context_regressor", state_first=False, bias=True, weight_scale=0.1)


@pytest.mark.qat  # trains through onnxruntime-training (or checks its refusal)
def test_training_from_a_per_sample_folder_batched_on_axis_1(tmp_path):
    generator = np.random.default_rng(4)
    truth = generator.standard_normal((14, 1)).astype(np.float32)
    folder = tmp_path / "train"
    folder.mkdir()
    for index in range(96):
        feed = {"input": generator.standard_normal((1, 6)).astype(np.float32),
                "state": generator.standard_normal((2, 1, 4)).astype(np.float32)}
        features = np.concatenate([feed["input"], feed["state"].transpose(1, 0, 2).reshape(1, 8)], axis=1)
        np.savez(folder / f"sample_{index:03d}.npz", **feed, target=features @ truth, sr=np.array(16000))
    dataset = open_dataset(folder, label_key="target", layout=DataLayout({"state": 1}, removed_inputs={"sr"}))
    assert dataset.input_names == ("input", "state") and dataset.skipped_keys == ("sr",)
    model = _context_regressor()
    config = TrainingConfig(epochs=6, batch_size=16, learning_rate=0.05, loss="mse", threads=1)
    trainer = Trainer(model, config, tmp_path / "work")
    result = trainer.fit(dataset, dataset)
    assert result.history[-1].validation_loss < 0.1 * result.history[0].validation_loss

"""End-to-end tests of the training driver on a tiny CNN (one BatchNormalization) and Fashion-MNIST slices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from qgraph.train import (
    CosineSchedule,
    StepSchedule,
    Trainer,
    TrainingConfig,
    TrainingDivergedError,
    TrainingStatus,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import fashion_batches, tiny_cnn  # noqa: E402

BASE = dict(batch_size=32, learning_rate=0.01, threads=1)


@pytest.fixture(scope="module")
def train_batches():
    return fashion_batches(1024, 32)


@pytest.fixture(scope="module")
def validation_batches():
    return fashion_batches(256, 64, offset=1024)


def initializers(model_or_path) -> dict[str, np.ndarray]:
    model = onnx.load(str(model_or_path)) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def plain_session(path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_training_api_imports_without_torch():
    code = ("import sys; from qgraph.train import training_api; api = training_api(); "
            "assert api.artifacts.OptimType and api.api.Module and api.onnxblock.optim.AdamW; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loss_decreases_and_accuracy_beats_chance(tmp_path, train_batches, validation_batches):
    events = []
    config = TrainingConfig(epochs=4, schedule=CosineSchedule(warmup_steps=8), **BASE)
    trainer = Trainer(tiny_cnn(channels=8), config, tmp_path, progress=events.append)
    result = trainer.fit(train_batches, validation_batches)
    assert result.status is TrainingStatus.COMPLETED
    assert result.steps == 4 * len(train_batches)
    assert result.history[-1].train_loss < result.history[0].train_loss - 0.3
    assert result.best_metric > 0.35  # chance is 0.10
    steps = [event for event in events if event.kind == "step"]
    epochs = [event for event in events if event.kind == "epoch"]
    assert len(steps) == result.steps and len(epochs) == 4
    assert all(event.samples_per_second > 0 for event in steps)
    assert steps[0].learning_rate == pytest.approx(0.01 / 8)  # first warm-up step
    assert epochs[-1].metric_name == "validation_accuracy"


def test_exported_model_matches_eval_mode(tmp_path, train_batches, validation_batches):
    trainer = Trainer(tiny_cnn(channels=8), TrainingConfig(epochs=1, **BASE), tmp_path)
    trainer.fit(train_batches)
    path = trainer.export(tmp_path / "trained.onnx", checkpoint="current")
    onnx.checker.check_model(str(path), full_check=True)
    exported = onnx.load(str(path))
    assert {opset.domain for opset in exported.opset_import} <= {"", "ai.onnx"}
    assert [node.op_type for node in exported.graph.node].count("BatchNormalization") == 1
    # BatchNormalization trained in training mode: the running statistics moved away from (0, 1).
    weights = initializers(exported)
    assert np.abs(weights["bn_mean"]).max() > 1e-3 and np.abs(weights["bn_var"] - 1).max() > 1e-3
    session = plain_session(path)
    for feeds, _ in validation_batches[:2]:
        expected = trainer.predict(feeds)
        actual = session.run(["logits"], feeds)[0]
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
        assert np.array_equal(actual.argmax(axis=1), expected.argmax(axis=1))


class _Interrupt(Exception):
    pass


def test_resume_continues_from_saved_step_and_matches_uninterrupted_run(tmp_path, train_batches):
    config = TrainingConfig(epochs=3, **BASE)
    per_epoch = len(train_batches)
    reference = Trainer(tiny_cnn(), config, tmp_path / "straight")
    reference.fit(train_batches)

    def interrupt_in_third_epoch(event):
        if event.kind == "step" and event.epoch == 3:
            raise _Interrupt

    interrupted = Trainer(tiny_cnn(), config, tmp_path / "resumed", progress=interrupt_in_third_epoch)
    with pytest.raises(_Interrupt):
        interrupted.fit(train_batches)

    resumed = Trainer(tiny_cnn(), config, tmp_path / "resumed")
    steps = []
    resumed.progress = lambda event: steps.append(event.step)
    result = resumed.fit(train_batches, resume_from=True)
    assert steps[0] == 2 * per_epoch + 1 and result.steps == 3 * per_epoch
    assert result.epochs_completed == 3 and [record.epoch for record in result.history] == [3]
    # AdamW moments and step count come back with the checkpoint, so the runs agree.
    expected = initializers(reference.export(tmp_path / "straight.onnx", checkpoint="last"))
    actual = initializers(resumed.export(tmp_path / "resumed.onnx", checkpoint="last"))
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_best_checkpoint_is_kept_when_validation_gets_worse(tmp_path, train_batches, validation_batches):
    # The learning rate jumps 100x after the first epoch: validation accuracy collapses but stays finite.
    config = TrainingConfig(epochs=3, schedule=StepSchedule(step_epochs=1, gamma=100.0), **BASE)
    trainer = Trainer(tiny_cnn(channels=8), config, tmp_path)
    result = trainer.fit(train_batches, validation_batches)
    accuracies = [record.validation_accuracy for record in result.history]
    assert result.status is TrainingStatus.COMPLETED
    assert result.best_epoch == 1 and max(accuracies[1:]) < accuracies[0]
    images = np.concatenate([feeds["input"] for feeds, _ in validation_batches])
    labels = np.concatenate([labels for _, labels in validation_batches])
    best = plain_session(trainer.export(tmp_path / "best.onnx", checkpoint="best"))
    accuracy = float(np.mean(best.run(["logits"], {"input": images})[0].argmax(axis=1) == labels))
    assert accuracy == pytest.approx(result.best_metric)


def test_nan_loss_stops_training_and_keeps_best_checkpoint(tmp_path, train_batches, validation_batches):
    poisoned = list(train_batches)
    feeds, labels = poisoned[3]
    broken = feeds["input"].copy()
    broken[0, 0, 0, 0] = np.nan
    current = {"epoch": None}

    def remember_epoch(event):
        current["epoch"] = event.epoch

    def batches():  # a callable source: a fresh iterator per pass (the first pass only counts batches)
        for index, batch in enumerate(poisoned):
            yield ({"input": broken}, labels) if current["epoch"] == 2 and index == 3 else batch

    trainer = Trainer(tiny_cnn(), TrainingConfig(epochs=3, **BASE), tmp_path, progress=remember_epoch)
    result = trainer.fit(batches, validation_batches)
    assert result.status is TrainingStatus.DIVERGED and result.diverged
    assert "diverged at epoch 2" in result.message and "best checkpoint" in result.message
    assert result.epochs_completed == 1 and result.best_epoch == 1
    assert result.best_checkpoint is not None and result.best_checkpoint.exists()
    with pytest.raises(TrainingDivergedError, match="diverged"):
        result.raise_for_status()
    exported = trainer.export(tmp_path / "best.onnx")
    assert all(np.isfinite(value).all() for value in initializers(exported).values())


def test_huge_learning_rate_diverges(tmp_path, train_batches):
    config = TrainingConfig(epochs=2, optimizer="sgd", learning_rate=1e12, max_grad_norm=None, batch_size=32, threads=1)
    result = Trainer(tiny_cnn(), config, tmp_path).fit(train_batches)
    assert result.diverged and "diverged" in result.message


def test_only_listed_parameters_train(tmp_path, train_batches):
    model = tiny_cnn()
    config = TrainingConfig(epochs=1, trainable=("fc_w", "fc_b"), **BASE)
    trainer = Trainer(model, config, tmp_path)
    assert set(trainer.artifacts.frozen) == {"conv1_w", "conv1_b", "bn_scale", "bn_bias", "bn_mean", "bn_var",
                                             "conv2_w", "conv2_b"}
    trainer.fit(train_batches[:8])
    before, after = initializers(model), initializers(trainer.export(tmp_path / "out.onnx", checkpoint="last"))
    assert np.array_equal(before["conv1_w"], after["conv1_w"]) and np.array_equal(before["conv2_w"], after["conv2_w"])
    assert not np.array_equal(before["fc_w"], after["fc_w"])


def test_reference_resnet_trains_and_exports(tmp_path):
    resnet = pytest.importorskip("qgraph.models.resnet")
    model = resnet.build_resnet(layout="small", input_shape=(1, 28, 28), num_classes=10, seed=0)
    batches = fashion_batches(128, 64)
    trainer = Trainer(model, TrainingConfig(epochs=1, batch_size=64, learning_rate=1e-3, threads=2), tmp_path)
    statistics = {name for name in trainer.artifacts.frozen}
    assert statistics and all(name in statistics for node in model.graph.node
                              if node.op_type == "BatchNormalization" for name in node.input[3:5])
    result = trainer.fit(batches[:1], batches[1:])
    assert result.status is TrainingStatus.COMPLETED
    path = trainer.export(tmp_path / "resnet.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    actual = plain_session(path).run(["logits"], batches[1][0])[0]
    np.testing.assert_allclose(actual, trainer.predict(batches[1][0]), rtol=1e-5, atol=1e-4)

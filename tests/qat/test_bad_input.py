"""QAT refuses bad input with one line (exit status 2 on the command line), and the CLI path end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from qgraph.cli import cli
from qgraph.errors import DataError
from qgraph.qat import QATOptions, run_qat
from qgraph.testing import run_model
from qgraph.train import TrainingDivergedError
from tests.ptq.small_models import residual_cnn
from tests.qat.helpers import CLASSES, dataset, labelled_data, quantized


def _run(model_and_result, train_data, **options):
    float_model, result = model_and_result
    settings = dict(epochs=1, batch_size=32, threads=1)
    settings.update(options)
    return run_qat(result.qdq_model, result.plan, result.parameters, float_model=float_model, train_data=train_data,
                   options=QATOptions(**settings))


def test_missing_label_key(tmp_path):
    inputs, labels = labelled_data(32)
    path = tmp_path / "train.npz"
    np.savez(path, input=inputs, label=labels)
    with pytest.raises(DataError, match="no label key 'y'.*keys: input, label.*--distill"):
        _run(quantized(), path, label_key="y")


def test_labels_out_of_range():
    inputs, _ = labelled_data(32)
    labels = np.full(32, CLASSES + 2, np.int64)
    with pytest.raises(DataError, match=f"label {CLASSES + 2} .*out of range for a model with {CLASSES} classes"):
        _run(quantized(), dataset(inputs, labels))


def test_outputs_that_are_not_logits():
    model = residual_cnn(classes=CLASSES)
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Softmax", ["raw"], ["logits"], axis=-1, name="softmax"))
    inputs, labels = labelled_data(32)
    with pytest.raises(DataError, match="comes from Softmax, not logits; the --labels loss is cross-entropy"):
        _run(quantized(model), dataset(inputs, labels))


class _PoisonedAfterFirstEpoch:
    """A dataset whose batches turn to NaN from the second pass on (a stand-in for a run that blows up)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.passes = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def iter_batches(self, *arguments, **keywords):
        self.passes += 1
        for batch in self.inner.iter_batches(*arguments, **keywords):
            if self.passes > 1:
                batch = dict(batch, input=np.full_like(batch["input"], np.nan))
            yield batch


def test_divergence_stops_keeps_the_best_checkpoint_and_says_so(tmp_path):
    model_and_result = quantized()
    inputs, labels = labelled_data(64, teacher=model_and_result[0])
    poisoned = _PoisonedAfterFirstEpoch(dataset(inputs, labels))
    # NaN inputs are clamped to finite codes by the input quantizer: the loss may stay finite for a step while the
    # gradients are not, so the stop comes from the loss or from the non-finite weights the update left
    with pytest.raises(TrainingDivergedError, match=r"training diverged at epoch 2, step \d+: (the loss is nan|the "
                       r"update made weights non-finite); "
                       r"training stopped and the best checkpoint \(epoch 1, .*\) is kept at .*best"):
        _run(model_and_result, poisoned, epochs=3, work_directory=tmp_path)
    assert (tmp_path / "checkpoints" / "best").exists()


@pytest.fixture
def files(tmp_path):
    model = residual_cnn(classes=CLASSES)
    model_path = tmp_path / "model.onnx"
    onnx.save(model, model_path)
    inputs, labels = labelled_data(96, teacher=model)
    np.savez(tmp_path / "calib.npz", input=inputs[:16])
    np.savez(tmp_path / "train.npz", input=inputs[:64], y=labels[:64])
    np.savez(tmp_path / "val.npz", input=inputs[64:], y=labels[64:])
    return tmp_path


def _optimize(files, *arguments):
    runner = CliRunner()
    command = ["optimize", str(files / "model.onnx"), "-o", str(files / "out.onnx"), "--calib",
               str(files / "calib.npz"), *arguments]
    return runner.invoke(cli, command)


@pytest.mark.parametrize("loss", [["--labels", "y"], ["--distill"]])
def test_cli_end_to_end(files, loss):
    result = _optimize(files, "--qat", "--train-data", str(files / "train.npz"), "--val-data", str(files / "val.npz"),
                       "--epochs", "2", "--lr", "1e-3", "--train-batch-size", "32", *loss)
    assert result.exit_code == 0, result.output
    assert "QAT: 2 epochs" in result.output
    model = onnx.load(files / "out.onnx")
    assert "QLinearConv" in {node.op_type for node in model.graph.node}
    inputs, _ = labelled_data(8, seed=3)
    assert run_model(model, {"input": inputs})["logits"].shape == (8, CLASSES)


@pytest.mark.parametrize("arguments, message", [
    (["--qat", "--train-data", "TRAIN"], "--qat needs a loss: --labels KEY"),
    (["--qat", "--train-data", "TRAIN", "--labels", "y", "--distill"], "choose one QAT loss"),
    (["--qat", "--labels", "y"], "--qat needs --train-data"),
    (["--train-data", "TRAIN", "--labels", "y"], "only apply to quantization-aware training: add --qat"),
    (["--qat", "--train-data", "TRAIN", "--labels", "label"], "no label key 'label'"),
])
def test_cli_bad_input_exits_2_with_one_line(files, arguments, message):
    arguments = [str(files / "train.npz") if argument == "TRAIN" else argument for argument in arguments]
    result = _optimize(files, *arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output

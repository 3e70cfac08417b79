"""Bad training data and mismatched model/loss combinations fail early with one-line qgraph errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.data import dataset_from_arrays
from qgraph.errors import DataError, QGraphError
from qgraph.train import CosineSchedule, Trainer, TrainingConfig

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_cnn, tiny_regressor  # noqa: E402

CONFIG = TrainingConfig(epochs=1, batch_size=8, learning_rate=0.01, threads=1)


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer(tiny_cnn(), CONFIG, tmp_path_factory.mktemp("bad_input"))


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


def test_missing_labels(trainer):
    with pytest.raises(DataError, match="no labels; the cross_entropy loss needs int64 class labels") as error:
        trainer.fit([({"input": images(8)}, None)])
    assert_one_line(error)


def test_dataset_without_label_key(trainer):
    with pytest.raises(DataError, match="no label key"):
        trainer.fit(dataset_from_arrays({"input": images(8)}))


def test_label_out_of_range_for_class_count(trainer):
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 10], np.int64)
    with pytest.raises(DataError, match=r"label 10 is out of range for a model with 10 classes") as error:
        trainer.fit([({"input": images(8)}, labels)])
    assert_one_line(error)


def test_negative_label(trainer):
    with pytest.raises(DataError, match="label -1 is out of range"):
        trainer.fit([({"input": images(2)}, np.array([-1, 0]))])


def test_float_labels_for_cross_entropy(trainer):
    with pytest.raises(DataError, match="integer class labels"):
        trainer.fit([({"input": images(2)}, np.array([0.0, 1.0]))])


def test_label_count_differs_from_batch(trainer):
    with pytest.raises(DataError, match="targets for a batch of 4 samples"):
        trainer.fit([({"input": images(4)}, np.array([0, 1]))])


def test_missing_model_input(trainer):
    with pytest.raises(DataError, match="lacks model input"):
        trainer.fit([({"image": images(2)}, np.array([0, 1]))])


def test_empty_dataset(trainer):
    with pytest.raises(DataError, match="no batches") as error:
        trainer.fit([])
    assert_one_line(error)
    empty = dataset_from_arrays({"input": images(0), "label": np.zeros(0, np.int64)}, label_key="label")
    with pytest.raises(DataError, match="no batches"):
        trainer.fit(empty)


def test_one_shot_iterator_for_several_epochs(tmp_path):
    trainer = Trainer(tiny_cnn(), TrainingConfig(epochs=2, batch_size=8, threads=1), tmp_path)
    with pytest.raises(QGraphError, match="one-shot iterator"):
        trainer.fit(iter([({"input": images(2)}, np.array([0, 1]))]))


def test_labels_for_output_that_is_not_2d_logits(tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["features"], pads=[1, 1, 1, 1])], "feature_map",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4, 28, 28])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DataError, match=r"cross_entropy loss expects 2-D logits .* rank 4; use loss='mse'") as error:
        Trainer(model, CONFIG, tmp_path)
    assert_one_line(error)


def test_integer_targets_for_mse(tmp_path):
    trainer = Trainer(tiny_regressor(), TrainingConfig(epochs=1, batch_size=4, loss="mse", threads=1), tmp_path)
    with pytest.raises(DataError, match="mse loss needs float targets"):
        trainer.fit([({"input": np.zeros((4, 8), np.float32)}, np.zeros((4, 3), np.int64))])


def test_unknown_trainable_name(tmp_path):
    with pytest.raises(QGraphError, match="not float initializers of the model: nope"):
        Trainer(tiny_cnn(), TrainingConfig(trainable=("nope",)), tmp_path)


def test_unknown_output_name(tmp_path):
    with pytest.raises(QGraphError, match="no output 'probabilities'"):
        Trainer(tiny_cnn(), TrainingConfig(output_name="probabilities"), tmp_path)


@pytest.mark.parametrize("arguments", [dict(epochs=0), dict(optimizer="lamb"), dict(loss="hinge"),
                                       dict(learning_rate=float("nan")), dict(momentum=1.0)])
def test_invalid_config(arguments):
    with pytest.raises(QGraphError):
        TrainingConfig(**arguments)


def test_resume_without_checkpoint(tmp_path):
    trainer = Trainer(tiny_cnn(), CONFIG, tmp_path)
    with pytest.raises(QGraphError, match="cannot resume: no checkpoint"):
        trainer.fit([({"input": images(2)}, np.array([0, 1]))], resume_from=True)
    assert isinstance(onnx.load(str(trainer.artifacts.eval_model)), onnx.ModelProto)


def test_one_shot_iterator_for_one_epoch(tmp_path):
    trainer = Trainer(tiny_cnn(), CONFIG, tmp_path)
    result = trainer.fit(iter([({"input": images(2)}, np.array([0, 1]))] * 3))
    assert result.steps == 3
    cosine = Trainer(tiny_cnn(), TrainingConfig(epochs=1, schedule=CosineSchedule()), tmp_path / "cosine")
    with pytest.raises(QGraphError, match="set TrainingConfig.steps_per_epoch"):
        cosine.fit(iter([({"input": images(2)}, np.array([0, 1]))]))

"""Training recipes, the committed Fashion-MNIST subsets, and the committed trained models.

The trained-model checks are real checks of the claims in ``models/trained/README.md``: each file loads, is valid
ONNX that plain onnxruntime runs, keeps its BatchNormalization nodes (CNNs) with trained running statistics, has
the parameter count the README states, and reaches the README's test accuracy on the committed 2000-image test
subset within 1.5 points (the standard error of a 2000-sample accuracy near 90% is about 0.7 points).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from qgraph.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from qgraph.data.fashion_mnist import DEFAULT_ROOT, ROOT_ENVIRONMENT_VARIABLE
from qgraph.models.common import count_parameters
from qgraph.models.recipes import (
    CALIBRATION_FILE,
    RECIPES,
    TEST_SUBSET_FILE,
    augment_batch,
    background_value,
    bundled_data_path,
    evaluate_model,
    get_recipe,
    load_bundled_data,
    resnet_recipe,
    train_recipe,
)

TRAINED_DIRECTORY = Path(__file__).resolve().parents[2] / "models" / "trained"
README = TRAINED_DIRECTORY / "README.md"
TOLERANCE_POINTS = 1.5
MAX_FILE_BYTES = 5_000_000


def _fashion_mnist_available() -> bool:
    import os

    root = Path(os.environ.get(ROOT_ENVIRONMENT_VARIABLE) or DEFAULT_ROOT)
    return (root / "train-images-idx3-ubyte.gz").is_file() or (root / "train-images-idx3-ubyte").is_file()


needs_fashion_mnist = pytest.mark.skipif(not _fashion_mnist_available(),
                                         reason="Fashion-MNIST IDX files not installed (dataset-fashion-mnist)")


# ------------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_is_frozen_and_builds_its_model(name):
    recipe = get_recipe(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.epochs = 100  # type: ignore[misc]
    model = recipe.build_model()
    onnx.checker.check_model(model)
    shape = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert shape == ["batch", 1, 28, 28]
    assert recipe.output_name == f"{name}_small_fmnist.onnx"
    assert recipe.optimizer in ("adamw", "sgd") and recipe.epochs >= 1 and recipe.warmup_epochs > 0


def test_unknown_recipe_names_the_choices():
    with pytest.raises(KeyError, match="resnet"):
        get_recipe("lenet")


def test_augment_batch_flips_and_shifts_against_numpy():
    images = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    flipped = augment_batch(images, np.random.default_rng(0), horizontal_flip=True, crop_padding=0, fill_value=-1.0)
    for index in range(2):  # every sample is either untouched or mirrored left-right
        assert np.array_equal(flipped[index], images[index]) or np.array_equal(flipped[index],
                                                                                images[index, :, :, ::-1])
    shifted = augment_batch(images, np.random.default_rng(1), horizontal_flip=False, crop_padding=1, fill_value=-1.0)
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    for index in range(2):  # each result is one 4x4 window of the padded image
        windows = [padded[index, :, top:top + 4, left:left + 4] for top in range(3) for left in range(3)]
        assert any(np.array_equal(shifted[index], window) for window in windows)
    assert np.array_equal(images, np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4))  # input untouched
    assert background_value("unit") == 0.0
    assert background_value("standard") == pytest.approx(-FASHION_MNIST_MEAN / FASHION_MNIST_STD)


# --------------------------------------------------------------------------------------------------- bundled data
@pytest.mark.parametrize(("name", "count"), [(CALIBRATION_FILE, 500), (TEST_SUBSET_FILE, 2000)])
def test_bundled_data_is_standard_normalised_fashion_mnist(name, count):
    path = bundled_data_path(name)
    assert path.parent.name == "data"
    images, labels = load_bundled_data(name)
    assert images.shape == (count, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (count,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    black = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
    assert images.min() == pytest.approx(black, abs=1e-5)
    assert images.max() == pytest.approx((1 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, abs=1e-5)
    assert abs(float(images.mean())) < 0.1  # standard normalisation: near zero mean


def test_bundled_data_path_names_what_exists():
    with pytest.raises(FileNotFoundError, match="fashion_mnist_calibration.npz"):
        bundled_data_path("missing.npz")


# ------------------------------------------------------------------------------------------------ a short run
@pytest.mark.slow
@pytest.mark.qat
@needs_fashion_mnist
def test_short_resnet_run_learns_and_exports_a_plain_onnxruntime_model(tmp_path):
    recipe = dataclasses.replace(resnet_recipe(), batch_size=32)
    output = tmp_path / "resnet.onnx"
    result = train_recipe(recipe, output, epochs=1, train_limit=1500, validation_limit=500, test_limit=500,
                          threads=1)
    assert result.train_samples == 1500 and result.epochs == 1 and result.best_epoch == 1
    assert result.validation_accuracy is not None and result.validation_accuracy > 0.6  # chance is 0.1
    assert result.test_accuracy > 0.6 and result.test_samples == 500

    model = onnx.load(output)
    onnx.checker.check_model(model, full_check=True)
    assert sum(node.op_type == "BatchNormalization" for node in model.graph.node) == sum(
        node.op_type == "BatchNormalization" for node in recipe.build_model().graph.node)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    images, labels = load_bundled_data(TEST_SUBSET_FILE)
    logits = session.run(None, {"input": images[:64]})[0]
    assert logits.shape == (64, 10) and np.all(np.isfinite(logits))
    assert evaluate_model(output, images, labels) > 0.6


# ------------------------------------------------------------------------------------------ committed models
def _stated_rows() -> dict[str, dict[str, str]]:
    """The measured table of models/trained/README.md, keyed by model name."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            header = None
            continue
        if header is None:
            header = cells
        elif cells[0] in RECIPES:
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def _percent(text: str) -> float:
    return float(re.sub(r"[%\s]", "", text))


@pytest.mark.parametrize("name", list(RECIPES))
def test_committed_model_matches_its_readme(name):
    recipe = get_recipe(name)
    path = TRAINED_DIRECTORY / recipe.output_name
    assert path.is_file(), f"{path} is missing; models/trained/README.md says how to reproduce it"
    assert path.stat().st_size <= MAX_FILE_BYTES
    stated = _stated_rows()[name]

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert [value.name for value in model.graph.input] == ["input"]
    assert [value.name for value in model.graph.output] == ["logits"]
    assert count_parameters(model) == int(stated["params"].replace(",", ""))

    operators = [node.op_type for node in model.graph.node]
    built = [node.op_type for node in recipe.build_model().graph.node]
    assert operators.count("BatchNormalization") == built.count("BatchNormalization")
    if built.count("BatchNormalization"):  # CNNs: inference-form BN with running statistics that training moved
        initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "BatchNormalization":
                assert not any(attribute.name == "training_mode" and attribute.i for attribute in node.attribute)
                assert len(node.output) == 1
        variances = [numpy_helper.to_array(initializers[node.input[4]]) for node in model.graph.node
                     if node.op_type == "BatchNormalization"]
        assert not all(np.allclose(variance, 1.0) for variance in variances)
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            assert len(node.output) == 1  # the statistics outputs training needed are gone again

    images, labels = load_bundled_data(TEST_SUBSET_FILE)
    accuracy = 100 * evaluate_model(path, images, labels)
    assert accuracy >= _percent(stated["test acc"]) - TOLERANCE_POINTS, (
        f"{name}: {accuracy:.2f}% on the committed 2000-image test subset, README states {stated['test acc']}")

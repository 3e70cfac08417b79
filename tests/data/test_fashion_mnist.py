"""Fashion-MNIST loader: the installed IDX files, and the refusals for missing or corrupt ones."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from qgraph.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    open_dataset,
    validate_dataset,
    write_fashion_mnist_npz,
)
from qgraph.data.fashion_mnist import DEFAULT_ROOT, read_idx
from qgraph.errors import DataError
from qgraph.models.resnet import build_resnet

installed = pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists(),
                               reason="apt-get install dataset-fashion-mnist")


def _write_idx(path, magic: int, array: np.ndarray, *, extra: bytes = b"", announce: int | None = None) -> None:
    dims = [announce if announce is not None else array.shape[0], *array.shape[1:]]
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in dims)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes() + extra)


def _fake_root(tmp_path, count: int = 6):
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (count, 28, 28))
    labels = np.arange(count) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, labels)
    return images, labels


@installed
def test_test_split_full():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.99
    assert set(np.unique(labels)) == set(range(10))
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))


@installed
def test_train_split_count_and_statistics():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 1, 28, 28)
    assert labels.min() == 0 and labels.max() == 9
    assert abs(float(images.mean()) - FASHION_MNIST_MEAN) < 1e-3
    assert abs(float(images.std()) - FASHION_MNIST_STD) < 1e-3


@installed
def test_limit_and_standard_normalization():
    unit, labels = load_fashion_mnist("test", limit=32)
    standard, same_labels = load_fashion_mnist("test", limit=32, normalization="standard")
    assert unit.shape == (32, 1, 28, 28) and labels.shape == (32,)
    np.testing.assert_array_equal(labels, same_labels)
    np.testing.assert_allclose(standard, (unit - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, rtol=1e-5, atol=1e-6)
    assert load_fashion_mnist("test", limit=0)[0].shape == (0, 1, 28, 28)


def test_class_names():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_parser_on_files_written_here(tmp_path):
    images, labels = _fake_root(tmp_path)
    loaded, loaded_labels = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_allclose(loaded[:, 0] * 255.0, images, atol=1e-4)
    np.testing.assert_array_equal(loaded_labels, labels)


def test_write_npz_streams_into_a_model_check(tmp_path):
    _fake_root(tmp_path)
    path = write_fashion_mnist_npz(tmp_path / "calibration", "test", limit=4, root=tmp_path)
    assert path.name == "calibration.npz"
    dataset = open_dataset(path, label_key="label")
    assert dataset.num_samples == 4 and dataset.input_names == ("input",)
    model = build_resnet("small")
    validate_dataset(dataset, model, num_classes=len(FASHION_MNIST_CLASSES))
    batch = next(dataset.iter_batches(3))
    assert batch["input"].shape == (3, 1, 28, 28) and batch["label"].dtype == np.int64


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_unknown_split():
    with pytest.raises(DataError, match="split"):
        load_fashion_mnist("validation")


@pytest.mark.parametrize("case", ["magic", "truncated", "trailing", "not-gzip"])
def test_corrupt_files(tmp_path, case):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    images = np.zeros((3, 28, 28))
    if case == "magic":
        _write_idx(path, 0x801, images)
    elif case == "truncated":
        _write_idx(path, 0x803, images, announce=5)
    elif case == "trailing":
        _write_idx(path, 0x803, images, extra=b"\x00" * 7)
    else:
        path.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(DataError, match="t10k-images"):
        read_idx(path, expected_magic=0x803)

"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package.

Fashion-MNIST (Zalando Research, MIT licence; packaged by Debian under MIT/Expat) holds 28×28 grayscale images of
clothing in 10 classes: 60000 training and 10000 test samples.

IDX format (big-endian): a 4-byte magic ``0x00 0x00 <type> <rank>`` — type ``0x08`` is unsigned byte — then
``rank`` 4-byte dimension sizes, then the values in C order. Images are ``0x00000803`` (N×28×28), labels
``0x00000801`` (N). The files are gzip-compressed; only the header and the first ``limit`` items are inflated.

Normalisation: ``"unit"`` (default) gives ``x = pixel / 255`` in [0, 1]; ``"standard"`` further gives
``(x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD`` with the training-set mean and standard deviation of the unit
values. Images are returned as float32 N×1×28×28 (NCHW, one channel) and labels as int64.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from qgraph.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides :data:`DEFAULT_ROOT` when no ``root`` is passed.
ROOT_ENVIRONMENT_VARIABLE = "QGRAPH_FASHION_MNIST_ROOT"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(FASHION_MNIST_CLASSES)
IMAGE_SHAPE = (1, 28, 28)
SPLIT_SIZES = {"train": 60000, "test": 10000}
#: Mean and standard deviation of the training images scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ROOT_ENVIRONMENT_VARIABLE) or DEFAULT_ROOT)


def _find_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {stem}.gz not found in {root}: install it with "
                    f"'apt-get install dataset-fashion-mnist' or pass root= the folder that holds the IDX files")


def read_idx(path: str | os.PathLike, *, expected_magic: int, limit: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzip-compressed when the name ends in ``.gz``); at most ``limit`` items."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            head = stream.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: truncated IDX file (no header)")
            magic = int.from_bytes(head, "big")
            if magic != expected_magic:
                raise DataError(f"{path}: IDX magic number is 0x{magic:08x}, expected 0x{expected_magic:08x}")
            rank = head[3]
            dims_bytes = stream.read(4 * rank)
            if len(dims_bytes) < 4 * rank:
                raise DataError(f"{path}: truncated IDX header")
            dims = [int.from_bytes(dims_bytes[4 * axis: 4 * axis + 4], "big") for axis in range(rank)]
            count = dims[0] if limit is None else min(dims[0], limit)
            item_size = int(np.prod(dims[1:], dtype=np.int64))
            wanted = count * item_size
            data = stream.read(wanted)
            if len(data) < wanted:
                raise DataError(f"{path}: truncated IDX data: header announces {dims[0]} items of {item_size} "
                                f"bytes, file holds only {len(data) // max(item_size, 1)}")
            if limit is None and stream.read(1):
                raise DataError(f"{path}: corrupt IDX file: data continues past the {dims[0]} items its header "
                                f"announces")
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read as a gzip IDX file ({error})") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *dims[1:])


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike | None = None,
    limit: int | None = None,
    *,
    normalization: str = "unit",
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (float32, N×1×28×28) and labels (int64, N) of ``split`` (``"train"`` or ``"test"``).

    ``root`` defaults to ``$QGRAPH_FASHION_MNIST_ROOT`` or ``/usr/share/datasets/fashion-mnist``; ``limit`` reads
    only the first ``limit`` samples; ``normalization`` is ``"unit"`` ([0, 1]) or ``"standard"`` (zero mean, unit
    variance over the training set).
    """
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    if normalization not in ("unit", "standard"):
        raise DataError(f"unknown normalization {normalization!r}; choose 'unit' or 'standard'")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be non-negative, got {limit}")
    directory = _resolve_root(root)
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find_file(directory, image_stem), expected_magic=_IMAGES_MAGIC, limit=limit)
    labels = read_idx(_find_file(directory, label_stem), expected_magic=_LABELS_MAGIC, limit=limit)
    if images.shape[1:] != IMAGE_SHAPE[1:]:
        raise DataError(f"{directory}: Fashion-MNIST images are {images.shape[1:]}, expected {IMAGE_SHAPE[1:]}")
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} images but {len(labels)} labels in the {split} split")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{directory}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    scaled = images.astype(np.float32).reshape(-1, *IMAGE_SHAPE) / np.float32(255.0)
    if normalization == "standard":
        scaled = (scaled - np.float32(FASHION_MNIST_MEAN)) / np.float32(FASHION_MNIST_STD)
    logger.debug("loaded %d Fashion-MNIST %s samples from %s", len(labels), split, directory)
    return scaled, labels.astype(np.int64)


def write_fashion_mnist_npz(
    path: str | os.PathLike,
    split: str = "train",
    limit: int | None = None,
    *,
    root: str | os.PathLike | None = None,
    normalization: str = "unit",
) -> Path:
    """Write ``split`` as an uncompressed ``.npz`` with keys ``"input"`` (images) and ``"label"``; returns the path.

    Uncompressed, so :func:`qgraph.data.open_dataset` memory-maps it (``open_dataset(path, label_key="label")``).
    """
    images, labels = load_fashion_mnist(split, root=root, limit=limit, normalization=normalization)
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")  # numpy.savez would append it anyway
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, input=images, label=labels)
    logger.info("wrote %d Fashion-MNIST %s samples to %s", len(labels), split, path)
    return path

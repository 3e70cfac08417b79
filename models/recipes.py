"""Training recipes for the small reference models on Fashion-MNIST, and the committed data they come with.

A :class:`Recipe` is a frozen description of one training run: which builder and keyword arguments make the FP32
graph, the input normalisation, epochs, batch size, optimizer, learning rate, weight decay, warm-up and cosine decay,
and the light augmentation applied in numpy. :func:`train_recipe` runs it with :mod:`qgraph.train`:

1. load Fashion-MNIST (``qgraph.data.load_fashion_mnist``) and hold out the *last* ``validation_size`` images of the
   training split for validation (the test split is never seen during training);
2. train with :class:`qgraph.train.Trainer`, keeping the checkpoint with the best validation top-1 accuracy;
3. export that checkpoint as an inference model: BatchNormalization nodes are kept, in inference form, with the
   running statistics that training-mode BatchNormalization updated;
4. measure top-1 accuracy of the exported file in a plain ``onnxruntime.InferenceSession`` on the 10 000 test images.

Learning rate: linear warm-up over ``warmup_epochs`` (a fraction of an epoch is fine) then cosine decay to
``minimum_learning_rate_ratio`` × the base rate over the whole run (:class:`qgraph.train.CosineSchedule`).

Augmentation (training batches only, per sample, seeded by epoch): with ``horizontal_flip`` each image is mirrored
with probability 1/2; with ``crop_padding = p > 0`` the image is padded by ``p`` pixels of background (the
normalised value of a black pixel) and a random 28×28 window is cut out, i.e. a shift of up to ``p`` pixels.

The epochs of the bundled recipes were chosen for a CPU shared with other work (onnxruntime-training 1.19.2, one
intra-op thread per run: on a busy machine one thread trained the ResNet twice as fast as two spinning threads);
see ``models/trained/README.md`` for the time they took and the accuracy they reached.

:func:`bundled_data_path` finds the small Fashion-MNIST subsets committed in ``models/data/`` (installed as
``qgraph.models/data``), so the bundled example and the tests run without Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qgraph.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from qgraph.models.common import count_parameters
from qgraph.models.mobilenet_v2 import build_mobilenet_v2
from qgraph.models.resnet import build_resnet
from qgraph.models.vit import build_vit
from qgraph.train import CosineSchedule, EpochRecord, ProgressEvent, Trainer, TrainingConfig

logger = logging.getLogger(__name__)

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
TRAIN_SPLIT_SIZE = 60000
DATA_DIRECTORY = Path(__file__).resolve().parent / "data"
#: Files committed in ``models/data/`` (see its README for how they were made).
CALIBRATION_FILE = "fashion_mnist_calibration.npz"
TEST_SUBSET_FILE = "fashion_mnist_test_subset.npz"


@dataclass(frozen=True)
class Recipe:
    """How one reference model is trained; see the module docstring for what each part does."""

    name: str
    builder: Callable[..., onnx.ModelProto]
    builder_arguments: tuple[tuple[str, Any], ...]
    normalization: str = "standard"
    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    warmup_epochs: float = 0.1
    minimum_learning_rate_ratio: float = 0.0
    max_grad_norm: float | None = 5.0
    horizontal_flip: bool = False
    crop_padding: int = 0
    validation_size: int = 5000
    seed: int = 0
    #: Top-1 test accuracy (percent) the recipe is meant to reach; the README reports what it did reach.
    goal_accuracy: float = 0.0

    def __post_init__(self) -> None:
        if self.normalization not in ("unit", "standard"):
            raise ValueError(f"normalization must be 'unit' or 'standard', got {self.normalization!r}")
        if self.crop_padding < 0 or self.warmup_epochs < 0:
            raise ValueError("crop_padding and warmup_epochs must be non-negative")
        if not 0 < self.validation_size < TRAIN_SPLIT_SIZE:
            raise ValueError(f"validation_size must be in (0, {TRAIN_SPLIT_SIZE}), got {self.validation_size}")

    def build_model(self) -> onnx.ModelProto:
        """The untrained FP32 graph (seeded)."""
        return self.builder(**dict(self.builder_arguments))

    @property
    def output_name(self) -> str:
        """The file name of the trained model in ``models/trained/``."""
        return f"{self.name}_small_fmnist.onnx"


@dataclass(frozen=True)
class RecipeResult:
    """What :func:`train_recipe` measured; accuracies are fractions in [0, 1]."""

    recipe: Recipe
    output_path: Path
    parameters: int
    epochs: int
    train_samples: int
    seconds: float
    best_epoch: int | None
    validation_accuracy: float | None
    test_accuracy: float
    test_samples: int
    history: tuple[EpochRecord, ...] = field(default_factory=tuple)


def _architecture() -> tuple[tuple[str, Any], ...]:
    """Builder arguments of the ``"small"`` layouts for Fashion-MNIST."""
    return (("layout", "small"), ("input_shape", INPUT_SHAPE), ("num_classes", NUM_CLASSES), ("seed", 0))


def resnet_recipe() -> Recipe:
    """ResNet-style CNN (0.68M parameters): AdamW, three epochs (about 40 minutes on one thread of a shared CPU)."""
    return Recipe(name="resnet", builder=build_resnet, builder_arguments=_architecture(),
                  epochs=3, batch_size=64, learning_rate=2e-3, weight_decay=1e-2, warmup_epochs=0.1,
                  horizontal_flip=True, goal_accuracy=91.0)


def mobilenet_v2_recipe() -> Recipe:
    """MobileNetV2-style CNN (0.15M parameters): AdamW, two epochs (about 20 minutes on one thread of a shared CPU)."""
    return Recipe(name="mobilenet_v2", builder=build_mobilenet_v2, builder_arguments=_architecture(),
                  epochs=2, batch_size=64, learning_rate=3e-3, weight_decay=1e-2, warmup_epochs=0.1,
                  horizontal_flip=True, goal_accuracy=90.0)


def vit_recipe() -> Recipe:
    """ViT-style transformer (0.14M parameters): AdamW, seven epochs (about 25 minutes on one thread of a shared
    CPU)."""
    return Recipe(name="vit", builder=build_vit, builder_arguments=_architecture(),
                  epochs=7, batch_size=128, learning_rate=1.5e-3, weight_decay=5e-2, warmup_epochs=0.5,
                  horizontal_flip=True, goal_accuracy=87.0)


RECIPES: dict[str, Callable[[], Recipe]] = {
    "resnet": resnet_recipe,
    "mobilenet_v2": mobilenet_v2_recipe,
    "vit": vit_recipe,
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (``"resnet"``, ``"mobilenet_v2"`` or ``"vit"``)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()


def bundled_data_path(name: str) -> Path:
    """Path of a file committed in ``models/data/`` (e.g. :data:`CALIBRATION_FILE`); raises if it is missing."""
    path = DATA_DIRECTORY / name
    if not path.is_file():
        available = sorted(child.name for child in DATA_DIRECTORY.glob("*.npz")) if DATA_DIRECTORY.is_dir() else []
        raise FileNotFoundError(f"{path}: no such bundled data file; available: {', '.join(available) or 'none'}")
    return path


def load_bundled_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (float32 N×1×28×28, ``"standard"`` normalisation) and labels (int64) of a bundled ``.npz`` file."""
    with np.load(bundled_data_path(name)) as archive:
        return archive["input"].astype(np.float32), archive["label"].astype(np.int64)


# ------------------------------------------------------------------------------------------------- augmentation
def background_value(normalization: str) -> float:
    """The normalised value of a black pixel (what crop padding fills with)."""
    return 0.0 if normalization == "unit" else -FASHION_MNIST_MEAN / FASHION_MNIST_STD


def augment_batch(images: np.ndarray, generator: np.random.Generator, *, horizontal_flip: bool,
                  crop_padding: int, fill_value: float) -> np.ndarray:
    """Randomly mirror and shift an N×C×H×W batch (a new array; the input is not modified)."""
    result = np.array(images, dtype=np.float32, copy=True)
    count, _, height, width = result.shape
    if horizontal_flip:
        flipped = generator.random(count) < 0.5
        result[flipped] = result[flipped, :, :, ::-1]
    if crop_padding > 0:
        padding = crop_padding
        padded = np.pad(result, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                        constant_values=np.float32(fill_value))
        offsets = generator.integers(0, 2 * padding + 1, size=(count, 2))
        for index, (top, left) in enumerate(offsets):
            result[index] = padded[index, :, top:top + height, left:left + width]
    return result


def _training_batches(recipe: Recipe, images: np.ndarray, labels: np.ndarray
                      ) -> Callable[[], Iterator[tuple[dict[str, np.ndarray], np.ndarray]]]:
    """A callable giving one shuffled, augmented epoch per call (the trainer calls it once per epoch)."""
    epoch_counter = [0]
    fill_value = background_value(recipe.normalization)

    def epoch() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        generator = np.random.default_rng((recipe.seed, epoch_counter[0]))
        epoch_counter[0] += 1
        order = generator.permutation(len(labels))
        for start in range(0, len(order), recipe.batch_size):
            chosen = np.sort(order[start:start + recipe.batch_size])
            batch = augment_batch(images[chosen], generator, horizontal_flip=recipe.horizontal_flip,
                                  crop_padding=recipe.crop_padding, fill_value=fill_value)
            yield {"input": batch}, labels[chosen]

    return epoch


def _evaluation_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                        ) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    return [({"input": images[start:start + batch_size]}, labels[start:start + batch_size])
            for start in range(0, len(labels), batch_size)]


def evaluate_model(model: str | os.PathLike | onnx.ModelProto, images: np.ndarray, labels: np.ndarray, *,
                   batch_size: int = 500, threads: int | None = None) -> float:
    """Top-1 accuracy (fraction) of an inference model in plain onnxruntime (all graph optimisations on)."""
    from qgraph.runtime import create_session

    session = create_session(model, optimize=True, threads=threads)
    input_name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = session.run(None, {input_name: images[start:start + batch_size]})[0]
        correct += int(np.count_nonzero(np.argmax(logits, axis=1) == labels[start:start + batch_size]))
    return correct / max(len(labels), 1)


# --------------------------------------------------------------------------------------------------- training
def training_config(recipe: Recipe, *, epochs: int, steps_per_epoch: int, threads: int | None) -> TrainingConfig:
    """The :class:`TrainingConfig` of ``recipe`` for a run of ``epochs`` epochs of ``steps_per_epoch`` batches."""
    warmup_steps = int(round(recipe.warmup_epochs * steps_per_epoch))
    return TrainingConfig(
        epochs=epochs, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
        optimizer=recipe.optimizer,  # type: ignore[arg-type]
        schedule=CosineSchedule(warmup_steps=warmup_steps, minimum_ratio=recipe.minimum_learning_rate_ratio),
        weight_decay=recipe.weight_decay, momentum=recipe.momentum, max_grad_norm=recipe.max_grad_norm,
        seed=recipe.seed, shuffle=False,  # the batch callable shuffles (and augments) itself
        threads=threads, steps_per_epoch=steps_per_epoch,
    )


def train_recipe(
    recipe: Recipe,
    output_path: str | os.PathLike,
    *,
    epochs: int | None = None,
    train_limit: int | None = None,
    validation_limit: int | None = None,
    test_limit: int | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    threads: int | None = None,
    root: str | os.PathLike | None = None,
    work_directory: str | os.PathLike | None = None,
) -> RecipeResult:
    """Train ``recipe`` on Fashion-MNIST, export the best checkpoint to ``output_path`` and measure test accuracy.

    ``epochs`` overrides the recipe's; ``train_limit``, ``validation_limit`` and ``test_limit`` take only the first
    samples of each part (for short runs); ``progress`` receives the trainer's :class:`ProgressEvent`s; ``root`` is
    the folder of the IDX files (default: Debian's); ``work_directory`` keeps the artifacts and checkpoints (default:
    a temporary folder removed afterwards).
    """
    epochs = recipe.epochs if epochs is None else epochs
    images, labels = load_fashion_mnist("train", root=root, normalization=recipe.normalization)
    split = len(labels) - recipe.validation_size
    train_images, train_labels = images[:split][:train_limit], labels[:split][:train_limit]
    validation_images, validation_labels = images[split:][:validation_limit], labels[split:][:validation_limit]
    test_images, test_labels = load_fashion_mnist("test", root=root, limit=test_limit,
                                                  normalization=recipe.normalization)
    steps_per_epoch = math.ceil(len(train_labels) / recipe.batch_size)
    config = training_config(recipe, epochs=epochs, steps_per_epoch=steps_per_epoch, threads=threads)
    model = recipe.build_model()
    parameters = count_parameters(model)
    logger.info("training %s (%d parameters): %d epochs of %d samples, %d validation, %s", recipe.name, parameters,
                epochs, len(train_labels), len(validation_labels), config)

    output_path = Path(output_path)
    with tempfile.TemporaryDirectory(prefix=f"qgraph-recipe-{recipe.name}-") as scratch:
        work = Path(work_directory) if work_directory is not None else Path(scratch)
        started = time.perf_counter()
        trainer = Trainer(model, config, work, progress=progress)
        result = trainer.fit(_training_batches(recipe, train_images, train_labels),
                             _evaluation_batches(validation_images, validation_labels, 500)).raise_for_status()
        trainer.export(output_path, checkpoint="best")
        seconds = time.perf_counter() - started
    test_accuracy = evaluate_model(output_path, test_images, test_labels, threads=threads)
    logger.info("%s: best validation accuracy %s at epoch %s, test accuracy %.4f, %.0f s", recipe.name,
                result.best_metric, result.best_epoch, test_accuracy, seconds)
    return RecipeResult(
        recipe=recipe, output_path=output_path, parameters=parameters, epochs=epochs,
        train_samples=len(train_labels), seconds=seconds, best_epoch=result.best_epoch,
        validation_accuracy=result.best_metric, test_accuracy=test_accuracy, test_samples=len(test_labels),
        history=result.history,
    )


# ------------------------------------------------------------------------------------------------ bundled data
def write_bundled_data(directory: str | os.PathLike = DATA_DIRECTORY, *, root: str | os.PathLike | None = None,
                       calibration_samples: int = 500, test_samples: int = 2000,
                       normalization: str = "standard") -> tuple[Path, Path]:
    """Write the committed subsets: the first ``calibration_samples`` training images and the first
    ``test_samples`` test images, keys ``input`` (float32 N×1×28×28, ``normalization``) and ``label`` (int64),
    with ``numpy.savez_compressed``. Returns the two paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for split, count, name in (("train", calibration_samples, CALIBRATION_FILE),
                               ("test", test_samples, TEST_SUBSET_FILE)):
        images, labels = load_fashion_mnist(split, root=root, limit=count, normalization=normalization)
        path = directory / name
        np.savez_compressed(path, input=images, label=labels)
        logger.info("wrote %d %s images to %s (%d bytes)", len(labels), split, path, path.stat().st_size)
        written.append(path)
    return written[0], written[1]

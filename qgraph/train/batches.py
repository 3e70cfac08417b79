"""Turning the user's training and validation data into checked ``(inputs, targets)`` batches.

Accepted sources, re-iterated once per epoch:

- a :class:`qgraph.data.Dataset` (anything with ``iter_batches`` and ``label_key``): batched with the configured
  ``batch_size``, shuffled with ``seed + epoch`` when shuffling is on; the label key becomes the targets;
- a zero-argument callable returning an iterator of ``(inputs, targets)`` pairs (a fresh iterator per epoch);
- a re-iterable collection (list, tuple) of ``(inputs, targets)`` pairs.

A one-shot iterator (a generator) can feed one epoch only, so it is refused for longer runs. The schedules need the
number of batches per epoch: a Dataset and a sized collection tell it, a callable is read once more to count them
(unless ``TrainingConfig.steps_per_epoch`` says), a one-shot iterator cannot be counted.

Every batch is checked before it reaches onnxruntime, so bad data fails with a one-line :class:`DataError` instead of
a runtime status: model inputs present, targets present, equal batch sizes; for cross-entropy, integer labels of
shape ``[batch]`` inside ``[0, classes)``; for MSE, float targets with the batch as first axis. An input's samples
lie along its own batch axis (a ``[layers, batch, hidden]`` state along axis 1; see :mod:`qgraph.data.layout`): a
Dataset's batches are counted along its keys' axes, other sources along the axes the checker was given (axis 0
where it was given none).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from qgraph.calibrate.driver import BatchAxes, batch_samples
from qgraph.data.readers import batch_axes_of
from qgraph.errors import DataError, QGraphError

logger = logging.getLogger(__name__)


Batch = tuple[dict[str, np.ndarray], np.ndarray]


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "iter_batches") and hasattr(data, "label_key")


def check_source(data: Any, *, epochs: int, role: str) -> None:
    """Refuse sources that cannot serve ``epochs`` passes."""
    if data is None:
        raise DataError(f"no {role} data was given")
    if _is_dataset(data):
        if data.label_key is None:
            raise DataError(f"the {role} dataset has no label key, so there are no labels or targets to train on")
        return
    if callable(data):
        return
    if not isinstance(data, Iterable):
        raise DataError(f"{role} data must be a qgraph Dataset, a callable or an iterable of (inputs, targets) pairs")
    if iter(data) is data and epochs > 1:
        raise QGraphError(
            f"the {role} data is a one-shot iterator but {epochs} epochs were asked; "
            "pass a list or a callable that returns a fresh iterator"
        )


def steps_per_epoch(data: Any, batch_size: int) -> int | None:
    """Batches per epoch when the source tells without being read, else ``None``."""
    if _is_dataset(data):
        return math.ceil(data.num_samples / batch_size)
    if not callable(data) and hasattr(data, "__len__"):
        return len(data)
    return None


def raw_batches(data: Any, *, batch_size: int, shuffle: bool, seed: int) -> Iterator[Any]:
    """The unchecked items one epoch of ``data`` yields."""
    if _is_dataset(data):
        label_key = data.label_key
        for batch in data.iter_batches(batch_size, shuffle=shuffle, seed=seed):
            batch = dict(batch)
            yield batch, batch.pop(label_key, None)
        return
    yield from (data() if callable(data) else data)


class BatchChecker:
    """Validates and converts batches for one model signature and loss."""

    def __init__(self, input_names: tuple[str, ...], *, loss: str, num_classes: int | None,
                 batch_axes: BatchAxes | None = None) -> None:
        self.input_names = input_names
        self.loss = loss
        self.num_classes = num_classes
        #: Input name -> the axis holding a batch's samples (None: a constant); unnamed inputs: axis 0.
        self.batch_axes = dict(batch_axes) if batch_axes is not None else None

    def batch_size(self, feeds: Mapping[str, np.ndarray], batch_axes: BatchAxes | None = None) -> int | None:
        """Samples in ``feeds`` along each input's batch axis (``batch_axes``, else the checker's); None when every
        input is a constant."""
        axes = batch_axes if batch_axes is not None else self.batch_axes
        counted = {name: array for name, array in feeds.items()
                   if (axes.get(name, 0) if axes is not None else 0) is not None and np.ndim(array) > 0}
        return batch_samples(counted, axes) if counted else None

    def __call__(self, item: Any, index: int, batch_axes: BatchAxes | None = None) -> Batch:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], Mapping):
            raise DataError(f"batch {index} is not an (inputs dict, targets) pair")
        inputs, targets = item
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise DataError(f"batch {index} lacks model input(s) {', '.join(missing)}")
        feeds = {name: np.asarray(inputs[name]) for name in self.input_names}
        batch_size = self.batch_size(feeds, batch_axes)
        if targets is None:
            expected = "int64 class labels" if self.loss == "cross_entropy" else "float targets"
            raise DataError(f"batch {index} has no labels; the {self.loss} loss needs {expected}")
        targets = np.asarray(targets)
        if batch_size is not None and (targets.ndim == 0 or targets.shape[0] != batch_size):
            raise DataError(f"batch {index}: {targets.shape} targets for a batch of {batch_size} samples")
        if self.loss == "cross_entropy":
            return feeds, self._labels(targets, index)
        if not np.issubdtype(targets.dtype, np.floating):
            raise DataError(f"batch {index}: the mse loss needs float targets, got {targets.dtype}")
        return feeds, targets.astype(np.float32, copy=False)

    def _labels(self, labels: np.ndarray, index: int) -> np.ndarray:
        if labels.ndim != 1:
            raise DataError(
                f"batch {index}: the cross_entropy loss needs labels of shape [batch], got {labels.shape}; "
                "for per-sample targets use loss='mse'"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"batch {index}: the cross_entropy loss needs integer class labels, got {labels.dtype}")
        if labels.size:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or (self.num_classes is not None and high >= self.num_classes):
                bad = low if low < 0 else high
                raise DataError(
                    f"batch {index}: label {bad} is out of range for a model with {self.num_classes} classes "
                    "(the logits' last dimension)"
                )
        return labels.astype(np.int64, copy=False)


def checked_batches(
    data: Any, checker: BatchChecker, *, batch_size: int, shuffle: bool, seed: int, role: str
) -> Iterator[Batch]:
    """One epoch of checked batches; raises :class:`DataError` if the source yields none."""
    count = 0
    # a Dataset knows where each key holds its samples; other sources rely on the checker's axes
    axes = batch_axes_of(data) if _is_dataset(data) else None
    for count, item in enumerate(raw_batches(data, batch_size=batch_size, shuffle=shuffle, seed=seed), start=1):
        yield checker(item, count - 1, axes)
    if count == 0:
        raise DataError(f"the {role} data yielded no batches (empty dataset)")


def is_one_shot(data: Any) -> bool:
    """Whether ``data`` is an iterator that a second pass would find exhausted."""
    return not _is_dataset(data) and not callable(data) and iter(data) is data


def count_batches(data: Any, *, batch_size: int) -> int:
    """Read one epoch of ``data`` to count its batches (for sources that do not know their length)."""
    return sum(1 for _ in raw_batches(data, batch_size=batch_size, shuffle=False, seed=0))

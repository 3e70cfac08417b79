"""Datasets that stream calibration, training and evaluation batches from disk.

Every reader satisfies the :class:`Dataset` protocol: ``num_samples``, ``input_names`` (the keys that feed the model,
in file order), ``label_key``, ``array_info(key)`` (shape, dtype and batch axis from file headers and the layout,
without reading data), ``labels()`` and ``iter_batches(batch_size, limit=None, shuffle=False, seed=0)``, which yields
``dict[str, numpy.ndarray]`` batches in which each key holds its samples along its own batch axis (axis 0 unless a
:class:`~qgraph.data.layout.DataLayout` says otherwise) and each constant (a scalar, or a key without a batch axis)
is the same array in every batch. When the dataset has a label key, each batch also carries the labels under that
key (``include_labels=False`` leaves them out).

:class:`ShardedDataset` is the one implementation: a list of shards (see :mod:`qgraph.data.storage`) concatenated
along each key's batch axis, so a folder of per-sample feeds (batch 1 each, exactly what the model takes) yields
batches of any size. A batch is gathered sample by sample from the shards it spans, then copied into a plain
``numpy.ndarray``; only the shard currently being read keeps its arrays open, so memory holds one batch plus, at
worst, the inflated members of one compressed ``.npz`` shard, plus one copy of each constant (whatever the number of
samples). Opening checks every shard's headers and reads its constants, to refuse shards that disagree.

Order and ``limit``: without shuffling, batches walk samples 0, 1, 2, … and ``limit`` keeps the first ``limit``
samples. With ``shuffle=True``, the order is ``numpy.random.default_rng(seed).permutation(num_samples)`` and
``limit`` keeps its first ``limit`` entries, so a given seed always yields the same batches. Rows of a shuffled batch
are read in sorted order within each shard (sequential disk access), then placed back in permutation order. The
last batch holds the remainder and may be smaller than ``batch_size``.

:func:`open_dataset` picks the reader from the path:

- ``*.npz`` file → one shard; ``*.npy`` file → one key named after the file stem;
- a directory holding ``input_*.pb`` (an ONNX ``test_data_set_*``) → one shard, inputs mapped by number;
- a directory holding ``test_data_set_*`` subdirectories → one shard per subdirectory, in numeric order;
- a directory of ``.npy`` files → one shard whose keys are the file stems (memory-mapped);
- a directory of ``.npz`` files → one shard per file, in name order (every file must hold the same keys).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from qgraph.data.layout import DataLayout
from qgraph.data.storage import (
    ArrayInfo,
    Shard,
    memory_shard,
    npy_directory_shard,
    npz_shard,
    onnx_test_data_shard,
)
from qgraph.errors import DataError

logger = logging.getLogger(__name__)


@runtime_checkable
class Dataset(Protocol):
    """What the calibration, training and evaluation drivers need from a source of batches."""

    @property
    def num_samples(self) -> int: ...

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def label_key(self) -> str | None: ...

    def array_info(self, key: str) -> ArrayInfo: ...

    def labels(self) -> np.ndarray | None: ...

    def iter_batches(self, batch_size: int, limit: int | None = None, shuffle: bool = False, seed: int = 0,
                     *, include_labels: bool = True) -> Iterator[dict[str, np.ndarray]]: ...


def _check_batching(batch_size: int, limit: int | None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")


def _laid_out(info: ArrayInfo, axis: int | None) -> ArrayInfo:
    """``info`` with its samples along ``axis``, or as read from the header where its rank has no such axis."""
    if axis is not None and axis >= len(info.shape):
        return info
    return dataclasses.replace(info, batch_axis=axis)


class ShardedDataset:
    """Shards concatenated along each key's batch axis; see the module docstring for order, limit and memory, and
    :mod:`qgraph.data.layout` for batch axes, constants and the keys of removed inputs."""

    def __init__(self, shards: Sequence[Shard], *, label_key: str | None = None, source: str = "<memory>",
                 layout: DataLayout | None = None) -> None:
        if not shards:
            raise DataError(f"{source}: no data found")
        self.source = source
        self.layout = layout if layout is not None else DataLayout()
        self._shards = list(shards)
        first = self._shards[0]
        all_keys = list(first.infos)
        for shard in self._shards[1:]:
            if set(shard.infos) != set(all_keys):
                missing = sorted(set(all_keys) - set(shard.infos)) or sorted(set(shard.infos) - set(all_keys))
                raise DataError(f"{shard.source}: keys {sorted(shard.infos)} differ from {sorted(all_keys)} in "
                                f"{first.source} (key '{missing[0]}')")
        for key, axis in self.layout.batch_axes.items():
            if key not in all_keys:
                axis_text = "none" if axis is None else axis
                raise DataError(f"{source}: --batch-axis {key}={axis_text} names no key of the data; keys are "
                                f"{', '.join(all_keys)}")
        if label_key is not None and label_key not in all_keys:
            raise DataError(f"{source}: label key '{label_key}' not found; keys are {', '.join(all_keys)}")
        #: Keys of inputs the model no longer takes (``layout.removed_inputs``): never read.
        self.skipped_keys = tuple(key for key in all_keys if key in self.layout.removed_inputs and key != label_key)
        keys = [key for key in all_keys if key not in self.skipped_keys]
        if not keys:
            raise DataError(f"{source}: every key ({', '.join(all_keys)}) belongs to an input the model no longer "
                            f"takes; there is nothing to feed")
        self._label_key = label_key
        self._input_names = tuple(key for key in keys if key != label_key)
        self._axes = {key: self.layout.batch_axis(key, first.infos[key].shape, first.source) for key in keys}
        if all(axis is None for axis in self._axes.values()):
            raise DataError(f"{source}: no key counts samples: {', '.join(keys)} are constants (scalars, or "
                            f"--batch-axis KEY=none), so there are no batches to take")
        self._constants: dict[str, np.ndarray] = {}
        counts = []
        for shard in self._shards:
            self._check_shard(shard, first, keys)
            counts.append(shard.count_samples(self._axes, explicit=self.layout.batch_axes))
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._infos: dict[str, ArrayInfo] = {}
        for key in keys:
            reference = dataclasses.replace(first.infos[key], batch_axis=self._axes[key])
            shape = reference.with_samples(int(self._starts[-1]))
            self._infos[key] = ArrayInfo(shape, reference.dtype, reference.batch_axis)
        if len(self._shards) > 1 or any(axis != 0 for axis in self._axes.values()):
            logger.debug("%s: %d shard(s), batch axes %s", source, len(self._shards), self._axes)
        self._current: Shard | None = None

    def _check_shard(self, shard: Shard, first: Shard, keys: Sequence[str]) -> None:
        """Per-sample shapes and dtypes as in the first shard; constants holding the first shard's values."""
        for key in keys:
            axis = self._axes[key]
            info, reference = _laid_out(shard.infos[key], axis), _laid_out(first.infos[key], axis)
            if (info.batch_axis != reference.batch_axis or info.dtype != reference.dtype
                    or info.with_samples(0) != reference.with_samples(0)):
                raise DataError(f"{shard.source}: key '{key}' is {info.describe()} but {reference.describe()} in "
                                f"{first.source}")
            if self._axes[key] is not None:
                continue
            value = np.array(shard.array(key))
            if key not in self._constants:
                self._constants[key] = value
            elif not np.array_equal(value, self._constants[key], equal_nan=value.dtype.kind in "fc"):
                raise DataError(
                    f"{shard.source}: key '{key}' is a constant (fed with every batch) but holds "
                    f"{np.array2string(value, threshold=8)} here and "
                    f"{np.array2string(self._constants[key], threshold=8)} in {first.source}; one batch feeds "
                    f"one value, so keep the samples of each value in a data set of their own")
        shard.release()

    # ------------------------------------------------------------------------------------------- protocol
    @property
    def num_samples(self) -> int:
        return int(self._starts[-1])

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._input_names

    @property
    def label_key(self) -> str | None:
        return self._label_key

    @property
    def keys(self) -> tuple[str, ...]:
        """Input names followed by the label key, if any."""
        return self._input_names + ((self._label_key,) if self._label_key else ())

    def array_info(self, key: str) -> ArrayInfo:
        if key not in self._infos:
            raise DataError(f"{self.source}: no key '{key}'; keys are {', '.join(self._infos)}")
        return self._infos[key]

    def labels(self) -> np.ndarray | None:
        """All labels in sample order (labels are small: one integer per sample), or ``None``."""
        if self._label_key is None:
            return None
        return self._gather_range([self._label_key], 0, self.num_samples)[self._label_key]

    def iter_batches(self, batch_size: int, limit: int | None = None, shuffle: bool = False, seed: int = 0,
                     *, include_labels: bool = True) -> Iterator[dict[str, np.ndarray]]:
        _check_batching(batch_size, limit)
        count = self.num_samples if limit is None else min(int(limit), self.num_samples)
        keys = self.keys if include_labels else self._input_names
        order = np.random.default_rng(seed).permutation(self.num_samples)[:count] if shuffle else None
        try:
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                if order is None:
                    yield self._gather_range(keys, start, stop)
                else:
                    yield self._gather_indices(keys, order[start:stop])
        finally:
            self._switch_to(None)

    def with_layout(self, layout: DataLayout) -> ShardedDataset:
        """The same shards read with another layout (file headers are not read again)."""
        return ShardedDataset(self._shards, label_key=self._label_key, source=self.source, layout=layout)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, samples={self.num_samples}, inputs={list(self.input_names)}, "
                f"label_key={self._label_key!r}, shards={len(self._shards)})")

    # --------------------------------------------------------------------------------------------- gather
    def _switch_to(self, shard: Shard | None) -> Shard | None:
        if shard is not self._current and self._current is not None:
            self._current.release()
        self._current = shard
        return shard

    def _gather_range(self, keys: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``start … stop-1`` of ``keys``, each shard they span opened once for all keys."""
        counted = [key for key in keys if self._infos[key].batch_axis is not None]
        parts: dict[str, list[np.ndarray]] = {key: [] for key in counted}
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for index in range(first, len(self._shards)):
            shard_start = int(self._starts[index])
            if shard_start >= stop:
                break
            local_start = max(start - shard_start, 0)
            local_stop = min(stop - shard_start, int(self._starts[index + 1]) - shard_start)
            if local_stop <= local_start:
                continue
            shard = self._switch_to(self._shards[index])
            for key in counted:
                window = (slice(None),) * self._infos[key].batch_axis + (slice(local_start, local_stop),)
                parts[key].append(shard.array(key)[window])
        batch = {}
        for key in keys:
            info = self._infos[key]
            if info.batch_axis is None:
                batch[key] = self._constants[key].copy()
            elif not parts[key]:
                batch[key] = np.empty(info.with_samples(0), info.dtype)
            elif len(parts[key]) == 1:
                batch[key] = np.array(parts[key][0])  # a copy, detached from the file
            else:
                batch[key] = np.concatenate(parts[key], axis=info.batch_axis)
        if self._current is not None:
            self._current.forget_pages()  # resident memory stays one batch, whatever the file's size
        return batch

    def _gather_indices(self, keys: Sequence[str], indices: np.ndarray) -> dict[str, np.ndarray]:
        """Samples ``indices`` (in that order) of ``keys``; each shard is opened once and read in ascending order."""
        batch = {}
        samples_first = {}
        for key in keys:
            info = self._infos[key]
            if info.batch_axis is None:
                batch[key] = self._constants[key].copy()
            else:
                batch[key] = np.empty(info.with_samples(len(indices)), info.dtype)
                samples_first[key] = np.moveaxis(batch[key], info.batch_axis, 0)  # a view: writing it fills the batch
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for index in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == index)
            local = indices[positions] - self._starts[index]
            ascending = np.argsort(local, kind="stable")
            shard = self._switch_to(self._shards[int(index)])
            for key, target in samples_first.items():
                source = np.moveaxis(shard.array(key), self._infos[key].batch_axis, 0)
                target[positions[ascending]] = source[local[ascending]]
            shard.forget_pages()
        return batch


def batch_axes_of(dataset: Dataset) -> dict[str, int | None]:
    """Input name -> the axis along which ``dataset``'s batches hold that input's samples (None: a constant), as the
    batches' consumers count samples (calibration, training)."""
    return {key: dataset.array_info(key).batch_axis for key in dataset.input_names}


def dataset_from_arrays(arrays: Mapping[str, np.ndarray], *, label_key: str | None = None,
                        layout: DataLayout | None = None) -> ShardedDataset:
    """A dataset over in-memory arrays keyed by input name (plus an optional label key)."""
    return ShardedDataset([memory_shard(arrays)], label_key=label_key, source="<memory>", layout=layout)


_TEST_DATA_SET = re.compile(r"test_data_set_(\d+)$")


def _test_data_set_directories(directory: Path) -> list[Path]:
    found = [(int(match.group(1)), child) for child in directory.iterdir()
             if child.is_dir() and (match := _TEST_DATA_SET.match(child.name))]
    return [child for _, child in sorted(found)]


def open_dataset(path: str | os.PathLike, *, label_key: str | None = None,
                 input_names: Sequence[str] | None = None, layout: DataLayout | None = None) -> ShardedDataset:
    """Open ``path`` with the reader its form calls for (see the module docstring).

    ``input_names`` is needed only for ONNX test data sets whose TensorProtos carry no names: ``input_i.pb`` then
    feeds ``input_names[i]``. ``label_key`` names the key that holds labels (not a model input). ``layout`` says
    along which axis each key counts samples and which keys belong to removed inputs (:mod:`qgraph.data.layout`).
    """
    path = Path(path)
    source = os.fspath(path)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_file():
        if path.suffix == ".npz":
            shards = [npz_shard(path)]
        elif path.suffix == ".npy":
            shards = [npy_directory_shard(path.parent, [path])]
        else:
            raise DataError(f"{source}: unknown data format; expected .npz, .npy, or a directory of them "
                            f"or of ONNX test_data_set_* folders")
        return ShardedDataset(shards, label_key=label_key, source=source, layout=layout)

    entries = sorted(path.iterdir())
    if any(entry.name.startswith("input_") and entry.suffix == ".pb" for entry in entries):
        shards = [onnx_test_data_shard(path, input_names)]
    elif test_sets := _test_data_set_directories(path):
        shards = [onnx_test_data_shard(directory, input_names) for directory in test_sets]
    else:
        npy_files = [entry for entry in entries if entry.is_file() and entry.suffix == ".npy"]
        npz_files = [entry for entry in entries if entry.is_file() and entry.suffix == ".npz"]
        if npy_files and npz_files:
            raise DataError(f"{source}: holds both .npy and .npz files; keep one form per directory")
        if npy_files:
            shards = [npy_directory_shard(path, npy_files)]
        elif npz_files:
            shards = [npz_shard(file) for file in npz_files]
        else:
            raise DataError(f"{source}: no .npz, .npy, input_*.pb or test_data_set_* entries in this directory")
    logger.debug("opened %s as %d shard(s)", source, len(shards))
    return ShardedDataset(shards, label_key=label_key, source=source, layout=layout)

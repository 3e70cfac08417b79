"""Datasets that stream calibration, training and evaluation batches from disk.

Every reader satisfies the :class:`Dataset` protocol: ``num_samples``, ``input_names`` (the keys that feed the model,
in file order), ``label_key``, ``array_info(key)`` (shape and dtype from file headers, without reading data),
``labels()`` and ``iter_batches(batch_size, limit=None, shuffle=False, seed=0)``, which yields
``dict[str, numpy.ndarray]`` batches whose first axis counts samples. When the dataset has a label key, each batch
also carries the labels under that key (``include_labels=False`` leaves them out).

:class:`ShardedDataset` is the one implementation: a list of shards (see :mod:`qgraph.data.storage`) concatenated
along the sample axis. A batch is gathered row by row from the shards it spans, then copied into a plain
``numpy.ndarray``; only the shard currently being read keeps its arrays open, so memory holds one batch plus, at
worst, the inflated members of one compressed ``.npz`` shard.

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

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

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


class ShardedDataset:
    """Shards concatenated along the sample axis; see the module docstring for order, limit and memory."""

    def __init__(self, shards: Sequence[Shard], *, label_key: str | None = None, source: str = "<memory>") -> None:
        if not shards:
            raise DataError(f"{source}: no data found")
        self.source = source
        self._shards = list(shards)
        keys = list(self._shards[0].infos)
        for shard in self._shards[1:]:
            if set(shard.infos) != set(keys):
                missing = sorted(set(keys) - set(shard.infos)) or sorted(set(shard.infos) - set(keys))
                raise DataError(f"{shard.source}: keys {sorted(shard.infos)} differ from {sorted(keys)} in "
                                f"{self._shards[0].source} (key '{missing[0]}')")
        if label_key is not None and label_key not in keys:
            raise DataError(f"{source}: label key '{label_key}' not found; keys are {', '.join(keys)}")
        self._label_key = label_key
        self._input_names = tuple(key for key in keys if key != label_key)
        self._infos: dict[str, ArrayInfo] = {}
        for key in keys:
            first = self._shards[0].infos[key]
            for shard in self._shards[1:]:
                info = shard.infos[key]
                if info.shape[1:] != first.shape[1:] or info.dtype != first.dtype:
                    raise DataError(f"{shard.source}: key '{key}' is {info.dtype}{list(info.shape[1:])} per sample "
                                    f"but {first.dtype}{list(first.shape[1:])} in {self._shards[0].source}")
            total = sum(shard.num_samples for shard in self._shards)
            self._infos[key] = ArrayInfo((total, *first.shape[1:]), first.dtype)
        counts = [shard.num_samples for shard in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._current: Shard | None = None

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
        return self._gather_range(self._label_key, 0, self.num_samples)

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
                    yield {key: self._gather_range(key, start, stop) for key in keys}
                else:
                    yield {key: self._gather_indices(key, order[start:stop]) for key in keys}
        finally:
            self._switch_to(None)

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

    def _gather_range(self, key: str, start: int, stop: int) -> np.ndarray:
        info = self._infos[key]
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for index in range(first, len(self._shards)):
            shard_start = int(self._starts[index])
            if shard_start >= stop:
                break
            shard = self._switch_to(self._shards[index])
            local_start, local_stop = max(start - shard_start, 0), min(stop - shard_start, shard.num_samples)
            if local_stop > local_start:
                parts.append(shard.array(key)[local_start:local_stop])
        if not parts:
            return np.empty((0, *info.shape[1:]), info.dtype)
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def _gather_indices(self, key: str, indices: np.ndarray) -> np.ndarray:
        info = self._infos[key]
        result = np.empty((len(indices), *info.shape[1:]), info.dtype)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for index in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == index)
            local = indices[positions] - self._starts[index]
            ascending = np.argsort(local, kind="stable")
            shard = self._switch_to(self._shards[int(index)])
            result[positions[ascending]] = shard.array(key)[local[ascending]]
        return result


def dataset_from_arrays(arrays: Mapping[str, np.ndarray], *, label_key: str | None = None) -> ShardedDataset:
    """A dataset over in-memory arrays keyed by input name (plus an optional label key)."""
    return ShardedDataset([memory_shard(arrays)], label_key=label_key, source="<memory>")


_TEST_DATA_SET = re.compile(r"test_data_set_(\d+)$")


def _test_data_set_directories(directory: Path) -> list[Path]:
    found = [(int(match.group(1)), child) for child in directory.iterdir()
             if child.is_dir() and (match := _TEST_DATA_SET.match(child.name))]
    return [child for _, child in sorted(found)]


def open_dataset(path: str | os.PathLike, *, label_key: str | None = None,
                 input_names: Sequence[str] | None = None) -> ShardedDataset:
    """Open ``path`` with the reader its form calls for (see the module docstring).

    ``input_names`` is needed only for ONNX test data sets whose TensorProtos carry no names: ``input_i.pb`` then
    feeds ``input_names[i]``. ``label_key`` names the key that holds labels (not a model input).
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
        return ShardedDataset(shards, label_key=label_key, source=source)

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
    return ShardedDataset(shards, label_key=label_key, source=source)

"""Where sample arrays live on disk, and how to reach them without reading more than a batch.

A *shard* is one group of files that holds every key (model input names, and optionally a label key) for a
contiguous run of samples: one ``.npz`` file, one directory of ``.npy`` files, one ONNX ``test_data_set_*``
directory, or arrays already in memory. A shard knows each key's shape and dtype from file headers alone
(:class:`ArrayInfo`) and opens its arrays only when a batch needs them.

What the formats allow:

- ``.npy`` files are memory-mapped (``mmap_mode="r"``): a batch reads only its own rows.
- ``.npz`` members written *uncompressed* (``numpy.savez``) are stored verbatim in the zip file, so their bytes
  are memory-mapped in place at ``local header offset + 30 + name length + extra length + npy header length``
  (the zip local file header is 30 fixed bytes followed by the name and the extra field): they stream like ``.npy``.
- ``.npz`` members written *compressed* (``numpy.savez_compressed``) cannot be sliced without inflating them: such
  a member is read whole, per key, the first time a batch needs that key, and dropped when the reader moves to
  another shard. That is the one place where more than a batch is in memory, and only for the current shard.
- ``input_*.pb`` TensorProtos are protobuf messages: each is parsed whole (these sets are small by nature).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import zipfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qgraph.errors import DataError

logger = logging.getLogger(__name__)

_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHLLLHH")  # 30 bytes
_ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class ArrayInfo:
    """Shape and dtype of one key, and the axis that counts its samples (``None``: a constant, fed with every batch).

    Read from a file header, ``batch_axis`` is 0 (a scalar's is ``None``); a dataset's layout sets the real one.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    batch_axis: int | None = 0

    def __post_init__(self) -> None:
        if not self.shape and self.batch_axis == 0:
            object.__setattr__(self, "batch_axis", None)  # a scalar has no axis to count samples along
        if self.batch_axis is not None and not 0 <= self.batch_axis < len(self.shape):
            raise DataError(f"batch axis {self.batch_axis} is beyond shape {self.shape}")

    @property
    def num_samples(self) -> int | None:
        """Samples along the batch axis; ``None`` for a constant, which counts none."""
        return None if self.batch_axis is None else self.shape[self.batch_axis]

    def with_samples(self, count: int) -> tuple[int, ...]:
        """The shape of ``count`` samples of this key (a constant's shape is its own)."""
        if self.batch_axis is None:
            return self.shape
        return self.shape[:self.batch_axis] + (count,) + self.shape[self.batch_axis + 1:]

    def describe(self) -> str:
        """dtype and shape with the batch axis written ``N``: ``float32[2, N, 128]``; a constant's shape as is."""
        sizes = ["N" if axis == self.batch_axis else str(size) for axis, size in enumerate(self.shape)]
        return f"{self.dtype}[{', '.join(sizes)}]"


def _read_npy_header(stream, source: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            shape, fortran_order, dtype = np.lib.format._read_array_header(stream, version)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{source}: not a valid .npy array ({error})") from None
    if dtype.hasobject:
        raise DataError(f"{source}: holds Python objects (pickled); only numeric arrays are supported")
    return tuple(int(size) for size in shape), bool(fortran_order), dtype


class Shard:
    """One contiguous run of samples with all keys; arrays open lazily through ``open_array``.

    ``infos`` hold what the file headers say (batch axis 0); :meth:`count_samples` counts the samples once a
    layout has said along which axis each key holds them.
    """

    def __init__(self, source: str, infos: Mapping[str, ArrayInfo],
                 open_array: Callable[[str], np.ndarray]) -> None:
        self.source = source
        self.infos = dict(infos)
        self._open_array = open_array
        self._opened: dict[str, np.ndarray] = {}

    def count_samples(self, axes: Mapping[str, int | None], explicit: Collection[str] = ()) -> int:
        """The samples every key of ``axes`` holds along its axis (constants, ``None``, count none).

        Raises :class:`DataError` when two keys count differently; ``explicit`` names the keys whose axis the user
        gave, so that the message suggests ``--batch-axis`` only for the others.
        """
        counts = {key: self.infos[key].shape[axis] for key, axis in axes.items() if axis is not None}
        if not counts:
            return 0
        values = list(counts.values())
        majority = max(values, key=values.count)  # on a tie, the count of the first key
        reference = next(key for key, count in counts.items() if count == majority)
        mismatched = next((key for key, count in counts.items() if count != majority), None)
        if mismatched is None:
            return majority
        message = (f"{self.source}: key '{mismatched}' has {counts[mismatched]} samples but key '{reference}' has "
                   f"{counts[reference]}")
        if axes[mismatched] == axes[reference] == 0:
            message += "; every key must have the same first dimension"
        else:
            message += (f" (counted along axis {axes[mismatched]} of {self.infos[mismatched].shape} and axis "
                        f"{axes[reference]} of {self.infos[reference].shape})")
        for hinted, other in ((mismatched, reference), (reference, mismatched)):
            shape = self.infos[hinted].shape
            if hinted in explicit or axes[hinted] != 0 or len(shape) < 2:
                continue
            # the first other axis whose size is the other key's count is the likely batch axis
            axis = next((axis for axis in range(1, len(shape)) if shape[axis] == counts[other]), None)
            if axis is None:
                continue
            message += (f"; if '{hinted}' holds its batch on another axis, say which (--batch-axis {hinted}={axis}, "
                        f"or --infer-state-axes for recurrent states [layers, batch, hidden])")
            break
        raise DataError(message)

    def array(self, key: str) -> np.ndarray:
        if key not in self._opened:
            self._opened[key] = self._open_array(key)
        return self._opened[key]

    def release(self) -> None:
        """Drop opened arrays (memory maps close, inflated npz members are freed)."""
        self._opened.clear()

    def forget_pages(self) -> None:
        """Unmap the pages read so far from the memory-mapped arrays (``MADV_DONTNEED``; they stay in the page
        cache, a later read maps them again). A file page once read counts in the process's resident memory until the
        map closes, so a reader walking a 600 MB ``.npz`` shard batch by batch would otherwise end at 600 MB more
        resident memory than one walking 60 MB; called after each batch is copied out."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        for array in self._opened.values():
            mapping = getattr(array, "_mmap", None)  # numpy.memmap keeps its mmap object here
            if mapping is not None:
                mapping.madvise(advice)


# ------------------------------------------------------------------------------------------------------------ npz
def npz_shard(path: Path) -> Shard:
    """A shard over an ``.npz`` file; stored members are memory-mapped, compressed ones inflated per key."""
    source = os.fspath(path)
    infos: dict[str, ArrayInfo] = {}
    offsets: dict[str, tuple[int, bool] | None] = {}  # key -> (absolute data offset, fortran) or None (inflate)
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for member in archive.infolist():
                if not member.filename.endswith(".npy"):
                    logger.warning("%s: ignoring member %s (not a .npy array)", source, member.filename)
                    continue
                key = member.filename[: -len(".npy")]
                with archive.open(member) as stream:
                    shape, fortran_order, dtype = _read_npy_header(stream, f"{source}: key '{key}'")
                    header_length = stream.tell()
                infos[key] = ArrayInfo(shape, dtype)
                offsets[key] = None
                if member.compress_type == zipfile.ZIP_STORED and not member.flag_bits & 0x1:
                    raw.seek(member.header_offset)
                    fields = _ZIP_LOCAL_HEADER.unpack(raw.read(_ZIP_LOCAL_HEADER.size))
                    if fields[0] == _ZIP_LOCAL_SIGNATURE:
                        start = member.header_offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
                        offsets[key] = (start + header_length, fortran_order)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise DataError(f"{source}: not a readable .npz file ({error})") from None
    if not infos:
        raise DataError(f"{source}: the .npz file holds no arrays")

    def open_array(key: str) -> np.ndarray:
        info, location = infos[key], offsets[key]
        if location is not None and 0 not in info.shape:
            offset, fortran_order = location
            return np.memmap(path, dtype=info.dtype, mode="r", offset=offset, shape=info.shape,
                             order="F" if fortran_order else "C")
        logger.debug("%s: inflating compressed member '%s' (%s, %s)", source, key, info.shape, info.dtype)
        with np.load(path, allow_pickle=False) as archive:
            return archive[key]

    return Shard(source, infos, open_array)


# ------------------------------------------------------------------------------------------------ npy directory
def npy_directory_shard(directory: Path, files: Sequence[Path]) -> Shard:
    """A shard over ``.npy`` files named after their keys (``input.npy`` → key ``input``), memory-mapped."""
    infos: dict[str, ArrayInfo] = {}
    paths: dict[str, Path] = {}
    for file in files:
        try:
            with open(file, "rb") as stream:
                shape, _, dtype = _read_npy_header(stream, os.fspath(file))
        except OSError as error:
            raise DataError(f"{file}: cannot be read ({error})") from None
        infos[file.stem] = ArrayInfo(shape, dtype)
        paths[file.stem] = file

    def open_array(key: str) -> np.ndarray:
        mode = None if 0 in infos[key].shape else "r"
        return np.load(paths[key], mmap_mode=mode, allow_pickle=False)

    return Shard(os.fspath(directory), infos, open_array)


# ------------------------------------------------------------------------------------------ ONNX test data sets
_INPUT_FILE = re.compile(r"input_(\d+)\.pb$")


def _parse_tensor(file: Path) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(file.read_bytes())
    except Exception as error:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise DataError(f"{file}: not a serialized onnx TensorProto ({error})") from None
    if tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise DataError(f"{file}: not a serialized onnx TensorProto (no data type)")
    return tensor


def onnx_test_data_shard(directory: Path, input_names: Sequence[str] | None = None) -> Shard:
    """A shard over ``input_0.pb, input_1.pb, …`` in an ONNX ``test_data_set_*`` directory.

    Tensors map to input names by their number: ``input_i.pb`` feeds ``input_names[i]`` when names are given,
    otherwise the name stored in the TensorProto (or ``input_i`` when it has none). ``output_*.pb`` files are
    expected outputs, not inputs, and are ignored.
    """
    numbered = sorted((int(match.group(1)), file) for file in directory.iterdir()
                      if (match := _INPUT_FILE.match(file.name)))
    if not numbered:
        raise DataError(f"{directory}: no input_*.pb files in this test data set")
    if [number for number, _ in numbered] != list(range(len(numbered))):
        raise DataError(f"{directory}: input files are not numbered 0..{len(numbered) - 1} without gaps")
    if input_names is not None and len(input_names) != len(numbered):
        raise DataError(f"{directory}: {len(numbered)} input_*.pb files but the model has {len(input_names)} "
                        f"inputs ({', '.join(input_names)})")
    infos: dict[str, ArrayInfo] = {}
    files: dict[str, Path] = {}
    for number, file in numbered:
        tensor = _parse_tensor(file)
        key = input_names[number] if input_names is not None else (tensor.name or f"input_{number}")
        if key in infos:
            raise DataError(f"{file}: input name '{key}' appears twice in {directory}")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        infos[key] = ArrayInfo(tuple(int(size) for size in tensor.dims), dtype)
        files[key] = file

    def open_array(key: str) -> np.ndarray:
        return numpy_helper.to_array(_parse_tensor(files[key]))

    return Shard(os.fspath(directory), infos, open_array)


# ------------------------------------------------------------------------------------------------------ memory
def memory_shard(arrays: Mapping[str, np.ndarray], source: str = "<memory>") -> Shard:
    """A shard over arrays already in memory (nothing is copied until a batch is taken)."""
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    infos = {key: ArrayInfo(value.shape, value.dtype) for key, value in arrays.items()}
    return Shard(source, infos, arrays.__getitem__)

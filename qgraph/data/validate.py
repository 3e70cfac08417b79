"""Checking data against a model's input signature before any batch reaches onnxruntime.

onnxruntime's own errors for mismatched feeds name neither the file nor the fix, and NaN or Inf in calibration data
silently poisons every observer downstream. So data is checked here first, and each problem raises
:class:`~qgraph.errors.DataError` with one line naming the key and the expected versus actual shape, dtype or value:

- a model input with no key in the data (missing), or a key that is neither an input nor the label key (unexpected);
- wrong rank, or a dimension that differs from a fixed dimension of the model (symbolic dimensions such as
  ``batch`` accept any size; the axis of the data that counts samples — axis 0, or the key's batch axis of
  :mod:`qgraph.data.layout` — maps to the same axis of the model, and a model that fixes that dimension needs
  ``batch_size`` equal to it; a constant, fed with every batch, must match every fixed dimension);
- wrong dtype. One cast is offered, and only when asked (``cast_float64=True``): float64 data for a float32 input is
  converted batch by batch with a logged warning. It is the one conversion that keeps every value a model could
  reasonably see (up to float32 rounding; values beyond float32's range become Inf and are then reported). Integer
  or narrower float data is never converted silently: the user must say what the values mean;
- NaN or Inf in floating-point data (the whole set is scanned batch by batch; the message gives the counts and the
  first sample that holds one);
- an empty dataset;
- keys of inputs the model no longer takes (``DataLayout.removed_inputs``: fixed with ``--fix-input``) are no
  error: they are left out of every batch, and one INFO line names them;
- labels missing when a class count is given, labels that are not 1-D integers, labels out of ``[0, num_classes)``,
  or a label count different from the sample count.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from qgraph.data.layout import DataLayout
from qgraph.data.readers import Dataset, ShardedDataset, dataset_from_arrays
from qgraph.data.storage import ArrayInfo
from qgraph.errors import DataError
from qgraph.runtime import numpy_dtype_of

logger = logging.getLogger(__name__)

Dimension = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (ints for fixed dims, names or ``None`` for symbolic ones)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dimension, ...]

    def describe_shape(self) -> str:
        return "(" + ", ".join(str(size) if size is not None else "?" for size in self.shape) + ")"


def _dimension_from_proto(dimension: onnx.TensorShapeProto.Dimension) -> Dimension:
    if dimension.HasField("dim_value"):
        return int(dimension.dim_value)
    return dimension.dim_param or None


def input_signature(source) -> tuple[InputSpec, ...]:
    """The input signature of an ``onnx.ModelProto``/``GraphProto``, an ``onnxruntime.InferenceSession``, a list of
    its ``get_inputs()`` entries, or a sequence of :class:`InputSpec` (returned as is).

    For a ModelProto/GraphProto, graph inputs that are also initializers (IR < 4 style) are left out.
    """
    if isinstance(source, onnx.ModelProto):
        source = source.graph
    if isinstance(source, onnx.GraphProto):
        initializers = {tensor.name for tensor in source.initializer}
        specs = []
        for value in source.input:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            if not value.type.HasField("tensor_type"):
                raise DataError(f"model input '{value.name}' is not a tensor; only tensor inputs can be fed")
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
            shape = tuple(_dimension_from_proto(d) for d in tensor_type.shape.dim)
            specs.append(InputSpec(value.name, dtype, shape))
        return tuple(specs)
    if hasattr(source, "get_inputs"):
        source = source.get_inputs()
    specs = []
    for item in source:
        if isinstance(item, InputSpec):
            specs.append(item)
        else:  # onnxruntime NodeArg: name, type ("tensor(float)"), shape (ints, strings or None)
            shape = tuple(size if isinstance(size, int) or size is None else str(size) for size in item.shape)
            specs.append(InputSpec(item.name, np.dtype(numpy_dtype_of(item.type)), shape))
    return tuple(specs)


def _check_keys(keys: Sequence[str], specs: Sequence[InputSpec], label_key: str | None,
                skipped: Sequence[str] = ()) -> None:
    expected = [spec.name for spec in specs]
    for name in expected:
        if name not in keys:
            hint = ("; the data holds it, but it was left out as an input removed by --fix-input, which the model "
                    "still takes" if name in skipped else "")
            raise DataError(f"input '{name}': missing from the data (data keys: {', '.join(keys) or 'none'}; "
                            f"model inputs: {', '.join(expected)}){hint}")
    for key in keys:
        if key not in expected and key != label_key:
            hint = "" if label_key else "; if it holds labels, pass it as the label key"
            raise DataError(f"key '{key}': not an input of the model (model inputs: {', '.join(expected)}){hint}")


def _check_info(spec: InputSpec, info: ArrayInfo, *, cast_float64: bool, batch_size: int | None) -> bool:
    """Check one key's shape (but its batch axis) and dtype; returns True when the key needs a float64→float32 cast."""
    axis = info.batch_axis
    actual_text = "(" + ", ".join(str(size) for size in info.shape) + ")"
    if len(info.shape) != len(spec.shape):
        raise DataError(f"input '{spec.name}': expected rank {len(spec.shape)} shape {spec.describe_shape()}, "
                        f"got rank {len(info.shape)} shape {actual_text}")
    for dimension, wanted in enumerate(spec.shape):
        if dimension != axis and isinstance(wanted, int) and wanted != info.shape[dimension]:
            raise DataError(f"input '{spec.name}': expected shape {spec.describe_shape()}, got {actual_text} "
                            f"(dimension {dimension} is {info.shape[dimension]}, expected {wanted})")
    if axis is not None and isinstance(spec.shape[axis], int) and batch_size is not None and (
            batch_size != spec.shape[axis]):
        where = "" if axis == 0 else f" (axis {axis}, the data's batch axis)"
        raise DataError(f"input '{spec.name}': the model fixes the batch dimension to {spec.shape[axis]}{where} "
                        f"(shape {spec.describe_shape()}), but batch_size is {batch_size}")
    if info.dtype == spec.dtype:
        return False
    if cast_float64 and info.dtype == np.float64 and spec.dtype == np.float32:
        logger.warning("input '%s': data is float64, the model takes float32; casting each batch to float32",
                       spec.name)
        return True
    hint = " (pass cast_float64=True to convert, or store the data as float32)" if (
        info.dtype == np.float64 and spec.dtype == np.float32) else ""
    raise DataError(f"input '{spec.name}': expected dtype {spec.dtype}, got {info.dtype}{hint}")


def _check_label_array(labels: np.ndarray, label_key: str, num_samples: int, num_classes: int | None) -> None:
    if labels.ndim != 1:
        raise DataError(f"labels '{label_key}': expected shape ({num_samples},), got {labels.shape}")
    if labels.shape[0] != num_samples:
        raise DataError(f"labels '{label_key}': {labels.shape[0]} labels for {num_samples} samples")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels '{label_key}': expected an integer dtype (class indices), got {labels.dtype}")
    if num_classes is not None and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = int(np.count_nonzero((labels < 0) | (labels >= num_classes)))
            raise DataError(f"labels '{label_key}': expected values in [0, {num_classes - 1}], got range "
                            f"[{low}, {high}] ({bad} out of range)")


def _count_non_finite(name: str, batches: Iterator[dict[str, np.ndarray]], infos: Mapping[str, ArrayInfo]) -> None:
    """NaN and Inf per key over every batch; a constant, the same in every batch, is counted once."""
    counts = {key: [0, 0, None] for key in infos}  # NaN count, Inf count, first sample index
    counting = next((key for key, info in infos.items() if info.batch_axis is not None), None)
    offset = 0
    for index, batch in enumerate(batches):
        for key, info in infos.items():
            if info.batch_axis is None and index > 0:
                continue
            values = batch[key]
            nan, inf = np.isnan(values), np.isinf(values)
            bad = nan | inf
            if bad.any():
                record = counts[key]
                record[0] += int(nan.sum())
                record[1] += int(inf.sum())
                if record[2] is None and info.batch_axis is not None:
                    samples_first = np.moveaxis(bad, info.batch_axis, 0)
                    per_sample = samples_first.reshape(samples_first.shape[0], -1).any(axis=1)
                    record[2] = offset + int(np.flatnonzero(per_sample)[0])
        if counting is not None:
            offset += batch[counting].shape[infos[counting].batch_axis]
    for key, (nan_count, inf_count, first) in counts.items():
        if nan_count or inf_count:
            where = "a constant fed with every batch" if infos[key].batch_axis is None else f"first in sample {first}"
            raise DataError(f"input '{key}': holds {nan_count} NaN and {inf_count} Inf values in {name} ({where})")


class CastingDataset:
    """A dataset view that casts the named float64 keys to float32 in every batch."""

    def __init__(self, dataset: Dataset, keys: Sequence[str]) -> None:
        self._dataset = dataset
        self._keys = frozenset(keys)

    num_samples = property(lambda self: self._dataset.num_samples)
    input_names = property(lambda self: self._dataset.input_names)
    label_key = property(lambda self: self._dataset.label_key)

    def array_info(self, key: str) -> ArrayInfo:
        info = self._dataset.array_info(key)
        return dataclasses.replace(info, dtype=np.dtype(np.float32)) if key in self._keys else info

    def labels(self) -> np.ndarray | None:
        return self._dataset.labels()

    def iter_batches(self, batch_size: int, limit: int | None = None, shuffle: bool = False, seed: int = 0,
                     *, include_labels: bool = True) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._dataset.iter_batches(batch_size, limit, shuffle, seed, include_labels=include_labels):
            with np.errstate(over="ignore"):  # values beyond float32 become Inf, which the value check reports
                cast = {key: value.astype(np.float32) if key in self._keys else value for key, value in batch.items()}
            yield cast

    def __len__(self) -> int:
        return self.num_samples


class KeysLeftOut:
    """A dataset view without the named input keys (those of inputs the model no longer takes)."""

    def __init__(self, dataset: Dataset, keys: Sequence[str]) -> None:
        self._dataset = dataset
        self._keys = frozenset(keys)
        self.source = getattr(dataset, "source", type(dataset).__name__)

    num_samples = property(lambda self: self._dataset.num_samples)
    label_key = property(lambda self: self._dataset.label_key)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(key for key in self._dataset.input_names if key not in self._keys)

    def array_info(self, key: str) -> ArrayInfo:
        if key in self._keys:
            raise DataError(f"{self.source}: key '{key}' is left out (an input the model no longer takes)")
        return self._dataset.array_info(key)

    def labels(self) -> np.ndarray | None:
        return self._dataset.labels()

    def iter_batches(self, batch_size: int, limit: int | None = None, shuffle: bool = False, seed: int = 0,
                     *, include_labels: bool = True) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._dataset.iter_batches(batch_size, limit, shuffle, seed, include_labels=include_labels):
            yield {key: value for key, value in batch.items() if key not in self._keys}

    def __len__(self) -> int:
        return self.num_samples


def _apply_layout(dataset: Dataset, specs: Sequence[InputSpec], layout: DataLayout | None) -> Dataset:
    """``dataset`` read with ``layout`` (a ShardedDataset is re-read with it; any other dataset keeps its own batch
    axes), with the keys of removed inputs left out and named in one INFO line."""
    if layout is not None and isinstance(dataset, ShardedDataset) and dataset.layout != layout:
        dataset = dataset.with_layout(layout)
    removed = (layout if layout is not None else getattr(dataset, "layout", DataLayout())).removed_inputs
    expected = {spec.name for spec in specs}
    left_out = [key for key in dataset.input_names if key in removed and key not in expected]
    skipped = [key for key in getattr(dataset, "skipped_keys", ()) if key not in expected] + left_out
    if skipped:
        logger.info("%s: ignoring key(s) %s: no longer inputs of the model (fixed with --fix-input)",
                    getattr(dataset, "source", type(dataset).__name__), ", ".join(skipped))
    return KeysLeftOut(dataset, left_out) if left_out else dataset


def _describe_axes(dataset: Dataset, specs: Sequence[InputSpec]) -> str | None:
    """One phrase for the keys that do not count samples along axis 0, or ``None`` when every key does."""
    phrases = []
    for spec in specs:
        axis = dataset.array_info(spec.name).batch_axis
        if axis is None:
            phrases.append(f"'{spec.name}' is a constant fed with every batch")
        elif axis != 0:
            phrases.append(f"'{spec.name}' holds its samples along axis {axis}")
    return "; ".join(phrases) or None


def validate_dataset(
    dataset: Dataset,
    model_inputs,
    *,
    layout: DataLayout | None = None,
    num_classes: int | None = None,
    batch_size: int | None = None,
    check_values: bool = True,
    cast_float64: bool = False,
    scan_batch_size: int = 256,
) -> Dataset:
    """Check ``dataset`` against ``model_inputs`` (see :func:`input_signature`); returns the dataset to read from.

    ``layout`` (default: the dataset's own) gives each key's batch axis and the inputs the model no longer takes
    (:mod:`qgraph.data.layout`); a :class:`ShardedDataset` opened with another layout is re-read with this one. The
    returned dataset is ``dataset`` itself, or a view over it that casts float64 keys (``cast_float64``) or leaves
    out the keys of removed inputs. ``num_classes`` makes labels required and bounds them. ``check_values`` scans
    every batch for NaN and Inf (memory stays at one batch of ``scan_batch_size`` samples).
    """
    specs = input_signature(model_inputs)
    dataset = _apply_layout(dataset, specs, layout)
    name = getattr(dataset, "source", type(dataset).__name__)
    label_key = dataset.label_key
    keys = list(dataset.input_names) + ([label_key] if label_key else [])
    _check_keys(keys, specs, label_key, getattr(dataset, "skipped_keys", ()))
    if dataset.num_samples == 0:
        raise DataError(f"{name}: the dataset is empty (0 samples)")
    to_cast = [spec.name for spec in specs
               if _check_info(spec, dataset.array_info(spec.name), cast_float64=cast_float64, batch_size=batch_size)]
    if num_classes is not None:
        if label_key is None:
            raise DataError(f"{name}: labels are required ({num_classes} classes) but no label key was given")
        _check_label_array(dataset.labels(), label_key, dataset.num_samples, num_classes)
    elif label_key is not None:
        _check_label_array(dataset.labels(), label_key, dataset.num_samples, None)
    if (axes := _describe_axes(dataset, specs)) is not None:
        logger.info("%s: %s", name, axes)
    checked: Dataset = CastingDataset(dataset, to_cast) if to_cast else dataset
    if check_values:
        floating = {spec.name: checked.array_info(spec.name) for spec in specs
                    if np.issubdtype(checked.array_info(spec.name).dtype, np.floating)}
        if floating:
            _count_non_finite(name, checked.iter_batches(scan_batch_size, include_labels=False), floating)
    return checked


def validate_batch(
    batch: Mapping[str, np.ndarray],
    model_inputs,
    *,
    label_key: str | None = None,
    num_classes: int | None = None,
    cast_float64: bool = False,
    layout: DataLayout | None = None,
) -> dict[str, np.ndarray]:
    """Check one in-memory batch (``{input name: array}``, plus labels under ``label_key``) with the same rules as
    :func:`validate_dataset`; returns the batch, with float64 keys cast when ``cast_float64`` is set and the keys of
    removed inputs left out."""
    for key, value in batch.items():
        if not isinstance(value, np.ndarray):
            raise DataError(f"key '{key}': expected a numpy array, got {type(value).__name__}")
    if label_key is not None and label_key not in batch:
        raise DataError(f"labels '{label_key}': missing from the batch (keys: {', '.join(batch)})")
    dataset = validate_dataset(dataset_from_arrays(batch, label_key=label_key, layout=layout), model_inputs,
                               num_classes=num_classes, cast_float64=cast_float64)
    return next(dataset.iter_batches(max(dataset.num_samples, 1)))

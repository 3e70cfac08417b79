"""Calibration feeds for a KV-cache decoder graph: prompts become prefill calls with an empty past.

A decoder exported "with past" takes ``input_ids``, ``attention_mask``, ``position_ids`` and, per layer,
``past_key_values.N.key/value [batch, heads, past_sequence, head_dim]``. Calibration prompts usually hold only
``input_ids`` (and perhaps ``attention_mask``). For a prefill call the missing inputs are:

- ``attention_mask``: ones ``[batch, sequence]``;
- ``position_ids``: ``cumsum(attention_mask) − 1`` clipped at 0 on the last ``sequence`` positions (0, 1, … without
  padding; a left-padded row starts at 0 on its first real token, as Hugging Face's generate computes them);
- every past tensor: an empty ``[batch, heads, 0, head_dim]`` float array, heads and head_dim read from the graph
  input's static shape.

A batch that holds some past tensors but not all is refused, naming the missing keys: a partial cache cannot be
completed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx

from qgraph.errors import DataError

PAST_PREFIX = "past_key_values."


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The feedable inputs of ``model`` (graph inputs that are not initializers)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                     for dim in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), dims))
    return specs


def complete_feeds(inputs: list[InputSpec], batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` with the inputs of a prefill call it lacks (see the module docstring); other models unchanged."""
    feeds = {name: np.asarray(array) for name, array in batch.items() if name in {spec.name for spec in inputs}}
    names = {spec.name for spec in inputs}
    past = [spec for spec in inputs if spec.name.startswith(PAST_PREFIX)]
    if not past or "input_ids" not in feeds:
        missing = sorted(names - set(feeds))
        if missing:
            raise DataError(f"calibration data lacks the model inputs {', '.join(missing)}")
        return feeds
    given_past = [spec.name for spec in past if spec.name in feeds]
    if given_past and len(given_past) != len(past):
        missing = [spec.name for spec in past if spec.name not in feeds]
        raise DataError(f"calibration data holds part of the KV cache; missing: {', '.join(missing)} "
                        "(give every past_key_values input, or none for prefill with an empty past)")
    input_ids = feeds["input_ids"].astype(np.int64)
    feeds["input_ids"] = input_ids
    batch_size, sequence = input_ids.shape
    past_length = feeds[past[0].name].shape[2] if given_past else 0
    if "attention_mask" in names and "attention_mask" not in feeds:
        feeds["attention_mask"] = np.ones((batch_size, past_length + sequence), np.int64)
    if "position_ids" in names and "position_ids" not in feeds:
        mask = feeds.get("attention_mask", np.ones((batch_size, past_length + sequence), np.int64))
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -sequence:]
        feeds["position_ids"] = positions.astype(np.int64)
    if not given_past:
        for spec in past:
            heads, head_dim = spec.shape[1], spec.shape[3]
            if not isinstance(heads, int) or not isinstance(head_dim, int) or heads <= 0 or head_dim <= 0:
                raise DataError(f"cannot build an empty past for {spec.name}: its heads and head_dim dimensions "
                                f"are not static ({spec.shape}); give the past tensors in the calibration data")
            feeds[spec.name] = np.zeros((batch_size, heads, 0, head_dim), spec.dtype)
    missing = sorted(names - set(feeds))
    if missing:
        raise DataError(f"calibration data lacks the model inputs {', '.join(missing)}")
    return feeds


def completed_batches(inputs: list[InputSpec], batches: Iterable[Mapping[str, np.ndarray]]
                      ) -> Iterator[dict[str, np.ndarray]]:
    for batch in batches:
        yield complete_feeds(inputs, batch)

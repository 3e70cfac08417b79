"""Where each key of a dataset counts its samples: batch axes, constants, and keys of inputs the model gave up.

A model input is not always batched on its first axis. The recurrent state that ONNX's LSTM, GRU and RNN read as
``initial_h``/``initial_c`` is ``[num_directions · layers, batch, hidden]``; a sample rate or a mode flag is a scalar
with no batch at all. :class:`DataLayout` says, for each key, along which axis its samples lie:

- ``batch_axes[key] = a`` (``--batch-axis key=a``): the samples of ``key`` lie along axis ``a``. A batch of the
  samples ``s … s+n-1`` is the slice ``x[:, …, s:s+n, …]`` with ``s:s+n`` at position ``a``, and shards (a folder of
  per-sample ``.npz`` feeds, each with batch 1) are concatenated along ``a``;
- ``batch_axes[key] = None`` (``--batch-axis key=none``), or any rank-0 array: ``key`` is a *constant*, fed
  unchanged with every batch and never counted as samples; every shard must hold the same value, since one batch
  feeds one value;
- any other key counts its samples along axis 0.

With ``infer_state_axes`` (``--infer-state-axes``) a key that has no explicit axis, holds rank-3 arrays and is named
like a recurrent state (:func:`is_state_name`) counts along axis 1, the ``[layers, batch, hidden]`` layout of ONNX's
recurrent operators. It is opt-in because a name is only a hint: a rank-3 ``state`` may as well be batch-first.

Every key that counts samples must count the same number N along its own axis; a key whose shape along the other
axes differs between shards, a batch axis at or beyond a key's rank, and a batch axis given for a key the data does
not hold are contradictions and raise :class:`~qgraph.errors.DataError`.

``removed_inputs`` names model inputs that are inputs no more (``--fix-input`` turned them into constants): data keys
with those names are left out, never read or checked, and :func:`qgraph.data.validate.validate_dataset` names them in
one INFO line. A feed folder written for the original model thus calibrates the model with fixed inputs unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

from qgraph.errors import DataError

#: Words of a name that mark a recurrent state (h and c are ONNX's names for the hidden and cell states).
STATE_WORDS = frozenset({"state", "states", "hidden", "cell", "h", "c", "hx", "cx", "h0", "c0", "hn", "cn"})

_WORD_SEPARATOR = re.compile(r"[^0-9a-z]+")


def is_state_name(name: str) -> bool:
    """Whether ``name`` reads as a recurrent state: one of its words (split at every character that is not a letter
    or a digit, lower-cased) is in :data:`STATE_WORDS`: ``state``, ``h0``, ``c0``, ``initial_h``, ``hidden_state``,
    ``lstm.state_in`` do; ``input``, ``sr``, ``chunk`` do not."""
    return any(word in STATE_WORDS for word in _WORD_SEPARATOR.split(name.lower()))


def _check_axis(key: str, axis) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis < 0:
        raise DataError(f"batch axis of key '{key}': expected a non-negative integer, or None for a key without a "
                        f"batch axis, got {axis!r}")
    return int(axis)


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """How the keys of calibration, training and evaluation data hold their samples (see the module docstring)."""

    #: Key -> the axis that counts its samples; None: a constant fed with every batch. Unnamed keys: axis 0.
    batch_axes: Mapping[str, int | None] = dataclasses.field(default_factory=dict)
    #: Rank-3 keys named like a recurrent state (:func:`is_state_name`) count their samples along axis 1.
    infer_state_axes: bool = False
    #: Model inputs that are no longer inputs (fixed with ``--fix-input``): their keys are left out of the data.
    removed_inputs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        axes = {}
        for key, axis in dict(self.batch_axes).items():
            if not isinstance(key, str) or not key:
                raise DataError(f"batch axes: {key!r} is not a key name")
            axes[key] = _check_axis(key, axis)
        if isinstance(self.removed_inputs, str):
            raise DataError(f"removed_inputs: expected a collection of input names, got the string "
                            f"{self.removed_inputs!r}")
        object.__setattr__(self, "batch_axes", MappingProxyType(axes))
        object.__setattr__(self, "removed_inputs", frozenset(self.removed_inputs))
        object.__setattr__(self, "infer_state_axes", bool(self.infer_state_axes))

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.batch_axes.items(), key=lambda item: item[0])), self.infer_state_axes,
                     self.removed_inputs))

    @classmethod
    def from_command_line(cls, batch_axis: Sequence[str] = (), *, infer_state_axes: bool = False) -> DataLayout:
        """The layout that ``--batch-axis KEY=AXIS`` (repeatable) and ``--infer-state-axes`` describe."""
        axes: dict[str, int | None] = {}
        for text in batch_axis:
            key, axis = parse_batch_axis(text)
            if key in axes and axes[key] != axis:
                raise DataError(f"--batch-axis {key} is given twice ({_axis_text(axes[key])} and {_axis_text(axis)})")
            axes[key] = axis
        return cls(axes, infer_state_axes=infer_state_axes)

    def with_removed_inputs(self, names: Iterable[str]) -> DataLayout:
        """This layout, with ``names`` (inputs ``--fix-input`` removed) added to the keys left out."""
        return dataclasses.replace(self, removed_inputs=self.removed_inputs | frozenset(names))

    @property
    def is_default(self) -> bool:
        """No batch axis named and none inferred (every key counts along axis 0; removed inputs aside)."""
        return not self.batch_axes and not self.infer_state_axes

    def for_dataset(self, dataset) -> DataLayout:
        """The layout to read an already opened ``dataset`` with: this one, unless this one is the default and the
        dataset carries a layout of its own, which is kept, with this one's removed inputs added."""
        own = getattr(dataset, "layout", None)
        if self.is_default and isinstance(own, DataLayout):
            return own.with_removed_inputs(self.removed_inputs)
        return self

    def batch_axis(self, key: str, shape: Sequence[int], source: str) -> int | None:
        """The axis along which ``key`` (arrays of ``shape``, as in ``source``) counts samples; None: a constant."""
        rank = len(shape)
        if key in self.batch_axes:
            axis = self.batch_axes[key]
            if axis is None:
                return None
            if rank == 0:
                raise DataError(f"{source}: key '{key}' is a scalar, so it has no axis {axis} to count samples along "
                                f"(--batch-axis {key}={axis}); a scalar is fed with every batch as it is")
            if axis >= rank:
                raise DataError(f"{source}: --batch-axis {key}={axis} is beyond the last axis of key '{key}' "
                                f"(shape {tuple(shape)}, axes 0 to {rank - 1})")
            return axis
        if rank == 0:
            return None
        if self.infer_state_axes and rank == 3 and is_state_name(key):
            return 1
        return 0

    def describe(self) -> str:
        """The layout as command-line options (``--batch-axis state=1 --infer-state-axes``), or ``default``."""
        words = [f"--batch-axis {key}={_axis_text(axis)}" for key, axis in self.batch_axes.items()]
        if self.infer_state_axes:
            words.append("--infer-state-axes")
        return " ".join(words) or "default"


def _axis_text(axis: int | None) -> str:
    return "none" if axis is None else str(axis)


def parse_batch_axis(text: str) -> tuple[str, int | None]:
    """``"KEY=AXIS"`` (``state=1``; ``sr=none`` for a key without a batch axis) split into the key and the axis."""
    key, separator, value = text.partition("=")
    key, value = key.strip(), value.strip().lower()
    if not separator or not key or not value:
        raise DataError(f"--batch-axis expects KEY=AXIS (for example state=1, or sr=none for a key without a batch "
                        f"axis), got {text!r}")
    if value == "none":
        return key, None
    if not value.isdigit():
        raise DataError(f"--batch-axis {key}: the axis must be a non-negative integer or none, got {value!r}")
    return key, int(value)

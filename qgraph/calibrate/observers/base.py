"""The observer protocol and the finite-value reductions every observer family shares.

An observer sees a tensor's calibration batches one at a time (``update``), keeps a small state whose size does not
depend on how many batches it saw, and derives a range ``(minimum, maximum)`` from it (``compute_range``); the spec
then turns the range into a scale and zero point (``compute_quant_params``). ``merge`` combines two observers of the
same tensor that saw disjoint batches, so calibration can be split across processes; ``state_dict`` / ``from_state``
round-trip the state through plain Python values and numpy arrays.

Non-finite values (NaN, +Inf, -Inf) are ignored by every observer: they carry no range information and would make
every scale infinite. Finite sentinels such as the attention-mask value -3.4e38 are *not* ignored — a tensor that holds
them should not be quantized at all, and silently dropping them would hide that. A batch with no finite values leaves
the state unchanged; an observer that never saw a finite value reports the range (0, 0), which gives scale 1.0.

The reductions here avoid extra passes and copies: per-tensor min/max is one pass of the native loop
(``qgraph/native/observer_loops.c``, built with the package; ``NATIVE`` tells whether it is) or two numpy reductions
without it, and only when the batch holds NaN or ±Inf is it filtered with ``np.isfinite``.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, TypeVar

import numpy as np

from qgraph.quant.spec import QuantParams, QuantSpec, compute_quant_params

logger = logging.getLogger(__name__)

try:
    from qgraph.native import _observer_loops as _native
except ImportError:  # built without a C compiler: the numpy paths give the same results, more slowly
    _native = None

#: True when the observers use the native single-pass loops of ``qgraph/native/observer_loops.c``.
NATIVE = _native is not None

ObserverT = TypeVar("ObserverT", bound="Observer")


def as_float_array(array: Any) -> np.ndarray:
    """The batch as a float array without copying when it already is float32/float64."""
    array = np.asarray(array)
    if array.dtype == np.float16 or not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32 if array.dtype == np.float16 else np.float64)
    return array


def finite_values(array: np.ndarray) -> np.ndarray:
    """The flattened finite values of ``array`` (a view when all values are finite and the array is contiguous)."""
    flat = array.reshape(-1)
    if flat.size == 0:
        return flat
    low, high = flat.min(), flat.max()
    if np.isfinite(low) and np.isfinite(high):
        return flat
    return flat[np.isfinite(flat)]


def finite_min_max(array: np.ndarray) -> tuple[float, float, int]:
    """(minimum, maximum, count) of the finite values; (inf, -inf, 0) when there are none."""
    flat = array.reshape(-1)
    if flat.size == 0:
        return float("inf"), float("-inf"), 0
    if NATIVE and flat.dtype in (np.float32, np.float64) and flat.flags.c_contiguous:
        low, high, all_finite = _native.min_max(flat)  # one pass instead of two
        if all_finite:
            return low, high, flat.size
    low, high = flat.min(), flat.max()
    if np.isfinite(low) and np.isfinite(high):
        return float(low), float(high), flat.size
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return float("inf"), float("-inf"), 0
    return float(flat.min()), float(flat.max()), flat.size


def channel_matrix(array: np.ndarray, axis: int) -> np.ndarray:
    """The array as (channels, elements per channel); a view when the channel axis is already first."""
    if array.ndim == 0:
        raise ValueError("per-channel observation needs a tensor with at least one dimension")
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {array.ndim}")
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], -1)


def per_channel_finite_min_max(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel (minimum, maximum, finite count) ignoring non-finite values; empty channels give (inf, -inf)."""
    matrix = channel_matrix(array, axis)
    if matrix.shape[1] == 0:
        channels = matrix.shape[0]
        return np.full(channels, np.inf), np.full(channels, -np.inf), 0
    low = matrix.min(axis=1).astype(np.float64)
    high = matrix.max(axis=1).astype(np.float64)
    if np.all(np.isfinite(low)) and np.all(np.isfinite(high)):
        return low, high, matrix.size
    finite = np.isfinite(matrix)
    low = np.where(finite, matrix, np.inf).min(axis=1).astype(np.float64)
    high = np.where(finite, matrix, -np.inf).max(axis=1).astype(np.float64)
    return low, high, int(np.count_nonzero(finite))


def batch_min_max(array: np.ndarray, axis: int | None, earlier: Any) -> tuple[Any, Any, int]:
    """One batch's finite (minimum, maximum, count): floats per tensor (``axis`` None), per-channel arrays along
    ``axis`` otherwise. ``earlier`` is the running per-channel minimum (None before data); a batch with another
    channel count is refused, since its ranges cannot be merged with the earlier ones."""
    if axis is None:
        return finite_min_max(array)
    low, high, count = per_channel_finite_min_max(array, axis)
    if earlier is not None and low.shape != np.shape(earlier):
        raise ValueError(
            f"batch has {low.shape[0]} channels on axis {axis}, earlier batches had {np.shape(earlier)[0]}"
        )
    return low, high, count


def empty_to_zero(low: Any, high: Any) -> tuple[Any, Any]:
    """Replace the (inf, -inf) of an empty observation with (0, 0), element-wise for per-channel ranges."""
    low = np.asarray(low, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    empty = low > high
    low = np.where(empty, 0.0, low)
    high = np.where(empty, 0.0, high)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


class Observer(abc.ABC):
    """Streaming range estimation for one tensor under one :class:`QuantSpec`."""

    #: Name used in ``state_dict`` and by the factory.
    kind: str = ""

    def __init__(self, spec: QuantSpec | None = None) -> None:
        self.spec = spec if spec is not None else QuantSpec()

    @abc.abstractmethod
    def update(self, array: Any) -> None:
        """Observe one batch of the tensor (any shape, any real dtype)."""

    @abc.abstractmethod
    def compute_range(self) -> tuple[Any, Any]:
        """(minimum, maximum): floats per tensor, float64 arrays of shape (channels,) per channel."""

    @abc.abstractmethod
    def merge(self: ObserverT, other: ObserverT) -> ObserverT:
        """A new observer equivalent to one that saw the batches of both (neither input is modified)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The state as plain values and numpy arrays; ``type(self).from_state`` rebuilds the observer."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls: type[ObserverT], state: dict[str, Any]) -> ObserverT:
        """Rebuild an observer from ``state_dict()``."""

    def compute_quant_params(self) -> QuantParams:
        """Scale and zero point for the observed range under ``self.spec``."""
        low, high = self.compute_range()
        return compute_quant_params(self.spec, low, high)

    def _check_mergeable(self, other: Observer) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(self).__name__} with {type(other).__name__}")
        if other.spec != self.spec:
            raise ValueError(f"cannot merge observers with different specs: {self.spec} vs {other.spec}")


def spec_to_state(spec: QuantSpec) -> dict[str, Any]:
    return {
        "bits": spec.bits,
        "signed": spec.signed,
        "symmetric": spec.symmetric,
        "axis": spec.axis,
        "narrow_range": spec.narrow_range,
        "reduce_range": spec.reduce_range,
    }


def spec_from_state(state: dict[str, Any]) -> QuantSpec:
    axis = state["axis"]
    return QuantSpec(
        bits=int(state["bits"]),
        signed=bool(state["signed"]),
        symmetric=bool(state["symmetric"]),
        axis=None if axis is None else int(axis),
        narrow_range=bool(state["narrow_range"]),
        reduce_range=bool(state["reduce_range"]),
    )


def check_state_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("observer") != kind:
        raise ValueError(f"state is for observer {state.get('observer')!r}, not {kind!r}")

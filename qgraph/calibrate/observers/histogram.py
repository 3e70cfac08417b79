"""Histogram observer: one fixed-size histogram per tensor, re-binned exactly as the range grows.

Layout
------
``B`` bins (a power of two, default 2048) of width ``w`` cover a range whose half-width is a power of two,
``R = 2^e``, chosen as the smallest power of two *strictly* above the largest magnitude seen. Two layouts:

* non-negative (nothing below zero seen yet, e.g. after ReLU): bins cover [0, R), ``w = R / B``;
* signed (something below zero seen): bins cover [-R, R), ``w = 2R / B``.

A value ``x`` lands in the signed bin ``s = floor(x / w)``, i.e. [s·w, (s+1)·w), stored at index ``s`` (non-negative)
or ``s + B/2`` (signed). Since ``w`` is a power of two, ``x / w`` is exact in floating point, so the bin of a value
never depends on rounding (except that a negative value below 2^-149·w in magnitude, which float32 rounds to -0,
counts in the zero bin). Zero lands in bin [0, w); a tensor that holds only zeros starts at ``e = -160`` (below any
float32 magnitude) so its counts sit in bin 0 of every later layout.

Re-binning (exact)
------------------
When a batch needs a larger ``e`` (or the first negative value switches the layout to signed), the new width is the
old one times ``f = 2^k``; every old bin [s·w, (s+1)·w) lies inside the new bin ``floor(s / f)``, because bin edges
are multiples of a power of two and zero is always an edge. Old counts are moved there unchanged — nothing is split
or interpolated. Consequences:

* the state after any sequence of batches equals the histogram of all values binned directly in the final layout,
  whatever the batch order or split; in particular ``merge`` (re-bin both to the wider layout, add counts) of two
  halves equals the observer of the whole, count for count;
* the total count is preserved by every re-binning;
* the price is resolution: the data fill between half and all of their side of the histogram (at least B/4 bins for
  the larger side of a signed histogram, at least B/2 for a non-negative one).

With the native loops (``qgraph/native/observer_loops.c``, built with the package) an update is one pass over the batch:
the values are binned in the current layout while their extremes and the layout's extent are checked block by block; at
the first block that does not fit (the range grew, a negative value arrived, a NaN) the loop stops, and the rest of the
batch takes the general path below (extremes, re-binning, then binning unchecked). About 1 ns a value, with the GIL
released so that observers of different tensors run in parallel. Without them, numpy bins in blocks of 2^16 values
through a reused float32 buffer (multiply by 1/w, floor, convert to int32, ``np.bincount``), so an update makes no
full-size temporary copy of the batch. In the non-negative layout the floor is a plain truncation, and the block is
counted into 4 interleaved sub-histograms (index + lane·B, summed at the end): a ReLU output is often half exact zeros,
and one counter incremented back to back stalls on its own store, which made ``np.bincount`` ~1.5× slower on such data
than on spread values. The state is the counts (int64), the exponent, the layout flag, the exact finite minimum and
maximum, and the count: O(B) whatever the number of batches.

Ranges (:mod:`qgraph.calibrate.observers.histogram_ranges`) are derived by the entropy (KL), percentile or MSE method
and always clamped to the exact observed [minimum, maximum].
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np

from qgraph.calibrate.observers import histogram_ranges
from qgraph.calibrate.observers.base import (
    NATIVE,
    Observer,
    _native,
    as_float_array,
    check_state_kind,
    finite_min_max,
    spec_from_state,
    spec_to_state,
)
from qgraph.quant.spec import QuantSpec

logger = logging.getLogger(__name__)

DEFAULT_BINS = 2048
DEFAULT_PERCENTILE = 99.999
DEFAULT_MSE_CANDIDATES = 128
METHODS = ("entropy", "percentile", "mse")

#: Exponent of an all-zero histogram: 2**-160 is below every float32 and float64-from-float32 magnitude of interest.
ZERO_ONLY_EXPONENT = -160

_BLOCK = 1 << 16
#: Interleaved sub-histograms used in the non-negative layout (see the module docstring).
_LANES = 4
_FLOAT32_NORMAL_EXPONENTS = range(-125, 127)


class HistogramObserver(Observer):
    """A power-of-two ranged, exactly re-binned histogram with entropy / percentile / MSE range derivation."""

    kind = "histogram"

    def __init__(
        self,
        spec: QuantSpec | None = None,
        *,
        method: str = "entropy",
        bins: int = DEFAULT_BINS,
        percentile: float = DEFAULT_PERCENTILE,
        mse_candidates: int = DEFAULT_MSE_CANDIDATES,
    ) -> None:
        super().__init__(spec)
        if self.spec.axis is not None:
            raise ValueError(
                "HistogramObserver is per tensor; per-channel specs use MinMaxObserver or the MSE weight observer"
            )
        if method not in METHODS:
            raise ValueError(f"unknown histogram method {method!r}; valid methods: {', '.join(METHODS)}")
        if not (isinstance(bins, (int, np.integer)) and bins >= 16 and bins & (bins - 1) == 0):
            raise ValueError(f"bins must be a power of two >= 16, got {bins!r}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        if mse_candidates < 2:
            raise ValueError(f"mse_candidates must be >= 2, got {mse_candidates!r}")
        self.method = method
        self.bins = int(bins)
        self.percentile = float(percentile)
        self.mse_candidates = int(mse_candidates)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.exponent: int | None = None  # R = 2**exponent; None before any finite value
        self.signed_layout = False
        self.minimum = math.inf
        self.maximum = -math.inf
        self.count = 0

    # ----------------------------------------------------------------------------------------------- layout helpers
    @property
    def _log2_bins(self) -> int:
        return self.bins.bit_length() - 1

    @staticmethod
    def _width_exponent(exponent: int, signed_layout: bool, log2_bins: int) -> int:
        return exponent - log2_bins + (1 if signed_layout else 0)

    @property
    def bin_width(self) -> float:
        if self.exponent is None:
            raise ValueError("the histogram is empty")
        return math.ldexp(1.0, self._width_exponent(self.exponent, self.signed_layout, self._log2_bins))

    @property
    def offset(self) -> int:
        """Index of the bin [0, w)."""
        return self.bins // 2 if self.signed_layout else 0

    def bin_edges(self) -> np.ndarray:
        """The B + 1 bin edges (float64, exact)."""
        width = self.bin_width
        return (np.arange(self.bins + 1, dtype=np.float64) - self.offset) * width

    def _rebin(self, exponent: int, signed_layout: bool) -> None:
        """Move the counts to a layout with a width at least as large (exact: old bins nest in new ones)."""
        if self.exponent is None:
            self.exponent, self.signed_layout = exponent, signed_layout
            return
        if exponent == self.exponent and signed_layout == self.signed_layout:
            return
        self.counts = rebinned_counts(
            self.counts, self.exponent, self.signed_layout, exponent, signed_layout, self._log2_bins
        )
        logger.debug(
            "histogram re-binned: exponent %d -> %d, signed %s -> %s",
            self.exponent, exponent, self.signed_layout, signed_layout,
        )
        self.exponent, self.signed_layout = exponent, signed_layout

    # ------------------------------------------------------------------------------------------------------- update
    def update(self, array: Any) -> None:
        flat = as_float_array(array).reshape(-1)
        if flat.size == 0:
            return
        if NATIVE and self.exponent is not None:
            # one pass: bin in the current layout, stopping at the first block that does not fit it
            flat = np.ascontiguousarray(flat)
            width_exponent = self._width_exponent(self.exponent, self.signed_layout, self._log2_bins)
            processed, low, high = _native.bin_counts(flat, width_exponent, self.offset, self.counts, True)
            if processed:
                self.minimum = min(self.minimum, low)
                self.maximum = max(self.maximum, high)
                self.count += processed
            if processed == flat.size:
                return
            flat = flat[processed:]
        low, high, finite = finite_min_max(flat)
        if finite == 0:
            return
        if finite < flat.size:
            flat = flat[np.isfinite(flat)]
        magnitude = max(-low, high)
        needed = math.frexp(magnitude)[1] if magnitude > 0 else ZERO_ONLY_EXPONENT
        exponent = needed if self.exponent is None else max(self.exponent, needed)
        self._rebin(exponent, self.signed_layout or low < 0)
        self._accumulate(flat)
        self.minimum = min(self.minimum, low)
        self.maximum = max(self.maximum, high)
        self.count += flat.size

    def _accumulate(self, flat: np.ndarray, *, native: bool | None = None) -> None:
        """Add the bin counts of ``flat`` (finite, within the current layout); ``native`` forces a path (tests)."""
        width_exponent = self._width_exponent(self.exponent, self.signed_layout, self._log2_bins)
        if NATIVE if native is None else native:
            _native.bin_counts(np.ascontiguousarray(flat), width_exponent, self.offset, self.counts, False)
            return
        # x · 2^-width_exponent is exact when the factor is a normal number of the working type.
        work_dtype = (
            np.float32 if (flat.dtype == np.float32 and -width_exponent in _FLOAT32_NORMAL_EXPONENTS) else np.float64
        )
        inverse_width = work_dtype(math.ldexp(1.0, -width_exponent))
        offset = work_dtype(self.offset)
        # Non-negative layout: every value is >= 0 (or -0.0), so truncation is the floor and lanes are cheap.
        lanes = 1 if self.signed_layout else _LANES
        lane_offsets = _lane_offsets(self.bins, lanes) if lanes > 1 else None
        scaled = np.empty(min(_BLOCK, flat.size), dtype=work_dtype)
        indices = np.empty(scaled.size, dtype=np.int32)
        counts = np.zeros(self.bins * lanes, dtype=np.int64)
        for start in range(0, flat.size, _BLOCK):
            block = flat[start : start + _BLOCK]
            block_scaled = scaled[: block.size]
            block_indices = indices[: block.size]
            np.multiply(block, inverse_width, out=block_scaled, casting="unsafe")
            if self.signed_layout:
                np.floor(block_scaled, out=block_scaled)
                block_scaled += offset
            block_indices[...] = block_scaled
            if lane_offsets is not None:
                block_indices += lane_offsets[: block.size]
            block_counts = np.bincount(block_indices, minlength=counts.size)
            if block_counts.size != counts.size:  # pragma: no cover - a value outside [-R, R) would be a bug
                raise AssertionError("histogram bin index out of range")
            counts += block_counts
        self.counts += counts.reshape(lanes, self.bins).sum(axis=0)

    # -------------------------------------------------------------------------------------------------- ranges
    def compute_range(self, method: str | None = None) -> tuple[float, float]:
        """Range by ``method`` (default: the observer's), clamped to the observed [minimum, maximum]."""
        method = self.method if method is None else method
        if method not in METHODS:
            raise ValueError(f"unknown histogram method {method!r}; valid methods: {', '.join(METHODS)}")
        if self.count == 0 or (self.minimum == 0.0 and self.maximum == 0.0):
            return 0.0, 0.0
        view = self._view()
        if method == "entropy":
            low, high = histogram_ranges.entropy_range(view, self.spec)
        elif method == "percentile":
            low, high = histogram_ranges.percentile_range(view, self.spec, self.percentile)
        else:
            low, high = histogram_ranges.mse_range(view, self.spec, self.mse_candidates)
        # Clamp to the observed extremes; keep 0 inside when the data reach it (quantization includes 0 anyway).
        low = min(max(low, self.minimum), self.maximum, 0.0 if self.minimum <= 0.0 else math.inf)
        high = max(min(high, self.maximum), low, 0.0 if self.maximum >= 0.0 else -math.inf)
        return float(low), float(high)

    def _view(self) -> histogram_ranges.HistogramView:
        return histogram_ranges.HistogramView(
            counts=self.counts,
            first_edge=-self.offset * self.bin_width,
            width=self.bin_width,
            minimum=self.minimum,
            maximum=self.maximum,
        )

    def extremes(self) -> tuple[float, float]:
        """The exact observed [minimum, maximum]: the min-max range of the same values ((0, 0) when empty)."""
        if self.count == 0:
            return 0.0, 0.0
        return float(self.minimum), float(self.maximum)

    def range_errors(self, chosen: tuple[float, float]) -> tuple[float, float]:
        """Expected squared quantization error summed over the observed values, with the range ``chosen`` and with
        the extremes (see :func:`histogram_ranges.expected_squared_error`): ``(chosen, minmax)``."""
        if self.count == 0 or (self.minimum == 0.0 and self.maximum == 0.0):
            return 0.0, 0.0
        view = self._view()
        low, high = self.extremes()
        errors = histogram_ranges.expected_squared_error(
            view, self.spec, np.array([chosen[0], min(low, 0.0)]), np.array([chosen[1], max(high, 0.0)]))
        return float(errors[0]), float(errors[1])

    # ----------------------------------------------------------------------------------------- merge and state
    def _options(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bins": self.bins,
            "percentile": self.percentile,
            "mse_candidates": self.mse_candidates,
        }

    def copy(self) -> HistogramObserver:
        return HistogramObserver.from_state(self.state_dict())

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        self._check_mergeable(other)
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
        merged = self.copy()
        if other.exponent is None:
            return merged
        merged._rebin(
            other.exponent if merged.exponent is None else max(merged.exponent, other.exponent),
            merged.signed_layout or other.signed_layout,
        )
        other_counts = rebinned_counts(
            other.counts, other.exponent, other.signed_layout, merged.exponent, merged.signed_layout, self._log2_bins
        )
        merged.counts = merged.counts + other_counts
        merged.minimum = min(merged.minimum, other.minimum)
        merged.maximum = max(merged.maximum, other.maximum)
        merged.count += other.count
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {
            "observer": self.kind,
            "spec": spec_to_state(self.spec),
            "options": self._options(),
            "counts": self.counts.copy(),
            "exponent": self.exponent,
            "signed_layout": self.signed_layout,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "count": self.count,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HistogramObserver:
        check_state_kind(state, cls.kind)
        observer = cls(spec_from_state(state["spec"]), **state["options"])
        counts = np.array(state["counts"], dtype=np.int64)
        if counts.shape != (observer.bins,):
            raise ValueError(f"state has {counts.shape} counts for {observer.bins} bins")
        observer.counts = counts
        observer.exponent = None if state["exponent"] is None else int(state["exponent"])
        observer.signed_layout = bool(state["signed_layout"])
        observer.minimum = float(state["minimum"])
        observer.maximum = float(state["maximum"])
        observer.count = int(state["count"])
        return observer


@functools.lru_cache(maxsize=8)
def _lane_offsets(bins: int, lanes: int) -> np.ndarray:
    """``(i mod lanes) · bins`` for i < _BLOCK (int32, read-only): element i of a block counts in sub-histogram i mod
    lanes."""
    offsets = (np.arange(_BLOCK, dtype=np.int32) % lanes) * np.int32(bins)
    offsets.flags.writeable = False
    return offsets


def rebinned_counts(
    counts: np.ndarray,
    exponent: int,
    signed_layout: bool,
    new_exponent: int,
    new_signed_layout: bool,
    log2_bins: int,
) -> np.ndarray:
    """Counts moved from one layout to a wider one: old signed bin s goes to new signed bin floor(s / 2^k)."""
    bins = counts.size
    old_width = HistogramObserver._width_exponent(exponent, signed_layout, log2_bins)
    new_width = HistogramObserver._width_exponent(new_exponent, new_signed_layout, log2_bins)
    shift = new_width - old_width
    if shift < 0 or (signed_layout and not new_signed_layout):
        raise ValueError("histograms can only be re-binned to a wider layout")
    if shift == 0 and signed_layout == new_signed_layout:
        return counts.copy()
    factor = 1 << min(shift, log2_bins + 1)  # beyond 2·B every bin maps to 0 or -1 anyway
    old_signed = np.arange(bins, dtype=np.int64) - (bins // 2 if signed_layout else 0)
    new_index = np.floor_divide(old_signed, factor) + (bins // 2 if new_signed_layout else 0)
    result = np.zeros(bins, dtype=np.int64)
    np.add.at(result, new_index, counts)
    return result

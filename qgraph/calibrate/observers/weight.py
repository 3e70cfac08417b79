"""Per-channel MSE weight observer: per output channel, the clipping range that minimises ||W_c - fq(W_c)||².

Weights are constants, observed once, so this observer keeps the weight itself (as a float32 (channels, elements)
matrix; memory = the weight's size, independent of the number of calibration batches). For every candidate fraction
f of a grid in [min_fraction, 1] (f = 1, the min-max range, is always included) it fake-quantizes all channels at
once with the range (f·min_c, f·max_c) and keeps, per channel, the f with the smallest exact squared error::

    error_c(f) = Σ_k (W[c, k] - fq(W[c, k]; f·min_c, f·max_c))²,   f*_c = argmin_f error_c(f)

Fake quantization clamps to the spec's [qmin, qmax] (narrow/reduced range included). Ties go to the larger f. The
loop runs over candidates only (vectorised over channels and elements), so a 512×512×3×3 kernel costs ~candidates
passes over 2.4 M floats. Non-finite weights are ignored (they count in no channel's range or error). Per-channel
min-max weights are :class:`~qgraph.calibrate.observers.minmax.MinMaxObserver` with ``spec.axis`` set.

``merge`` concatenates the observed elements per channel (two observers of slices of the same weight along a
non-channel axis merge into the observer of the whole weight).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from qgraph.calibrate.observers.base import (
    Observer,
    as_float_array,
    channel_matrix,
    check_state_kind,
    spec_from_state,
    spec_to_state,
)
from qgraph.quant.spec import QuantSpec, compute_quant_params

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = 64
DEFAULT_MIN_FRACTION = 0.1


def candidate_fractions(candidates: int, min_fraction: float) -> np.ndarray:
    """The grid of clipping fractions, ascending and ending at exactly 1.0."""
    return np.linspace(min_fraction, 1.0, candidates)


def channel_squared_errors(matrix: np.ndarray, spec: QuantSpec, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """Per-channel Σ (W - fq(W))² for ranges (lows[c], highs[c]); NaN entries of ``matrix`` are skipped."""
    params = compute_quant_params(spec.with_axis(0), lows, highs)
    scale = params.scale[:, None]
    zero_point = params.zero_point.astype(np.float32)[:, None]
    codes = np.divide(matrix, scale, dtype=np.float32)
    np.rint(codes, out=codes)
    codes += zero_point
    np.clip(codes, spec.qmin, spec.qmax, out=codes)
    codes -= zero_point
    codes *= scale
    codes -= matrix
    np.square(codes, out=codes)
    return np.nansum(codes, axis=1, dtype=np.float64)


def mse_weight_range(
    matrix: np.ndarray,
    spec: QuantSpec,
    *,
    candidates: int = DEFAULT_CANDIDATES,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) minimising the squared error of a (channels, elements) float32 matrix.

    Non-finite entries must already be NaN (they are skipped); channels without finite values get (0, 0).
    """
    with np.errstate(invalid="ignore"):
        low = np.nanmin(np.where(np.isnan(matrix), np.inf, matrix), axis=1).astype(np.float64)
        high = np.nanmax(np.where(np.isnan(matrix), -np.inf, matrix), axis=1).astype(np.float64)
    empty = low > high
    low, high = np.where(empty, 0.0, np.minimum(low, 0.0)), np.where(empty, 0.0, np.maximum(high, 0.0))
    best_error = np.full(low.shape, np.inf)
    best_fraction = np.ones(low.shape)
    for fraction in candidate_fractions(candidates, min_fraction)[::-1]:
        errors = channel_squared_errors(matrix, spec, fraction * low, fraction * high)
        better = errors < best_error * (1.0 - 1e-12)
        best_error = np.where(better, errors, best_error)
        best_fraction = np.where(better, fraction, best_fraction)
    logger.debug("per-channel MSE fractions: min %.3f mean %.3f", best_fraction.min(), best_fraction.mean())
    return best_fraction * low, best_fraction * high


class PerChannelMSEWeightObserver(Observer):
    """Per-channel clipping search for weights; ``spec.axis`` is the channel axis (required)."""

    kind = "weight_mse"

    def __init__(
        self,
        spec: QuantSpec | None = None,
        *,
        candidates: int = DEFAULT_CANDIDATES,
        min_fraction: float = DEFAULT_MIN_FRACTION,
    ) -> None:
        super().__init__(spec if spec is not None else QuantSpec(axis=0))
        if self.spec.axis is None:
            raise ValueError("PerChannelMSEWeightObserver needs a per-channel spec (QuantSpec.axis set)")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates!r}")
        if not 0.0 < min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
        self.candidates = int(candidates)
        self.min_fraction = float(min_fraction)
        self.matrix: np.ndarray | None = None  # (channels, elements) float32, non-finite stored as NaN

    def update(self, array: Any) -> None:
        matrix = channel_matrix(as_float_array(array), self.spec.axis).astype(np.float32)
        matrix[~np.isfinite(matrix)] = np.nan
        if self.matrix is None:
            self.matrix = matrix
            return
        if matrix.shape[0] != self.matrix.shape[0]:
            raise ValueError(
                f"batch has {matrix.shape[0]} channels on axis {self.spec.axis}, earlier had {self.matrix.shape[0]}"
            )
        self.matrix = np.concatenate([self.matrix, matrix], axis=1)

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.matrix is None:
            raise ValueError("per-channel observer has seen no weight, so the number of channels is unknown")
        return mse_weight_range(self.matrix, self.spec, candidates=self.candidates, min_fraction=self.min_fraction)

    def merge(self, other: PerChannelMSEWeightObserver) -> PerChannelMSEWeightObserver:
        self._check_mergeable(other)
        merged = PerChannelMSEWeightObserver(self.spec, candidates=self.candidates, min_fraction=self.min_fraction)
        for observer in (self, other):
            if observer.matrix is not None:
                if merged.matrix is None:
                    merged.matrix = observer.matrix.copy()
                else:
                    if observer.matrix.shape[0] != merged.matrix.shape[0]:
                        raise ValueError("cannot merge weight observers with different channel counts")
                    merged.matrix = np.concatenate([merged.matrix, observer.matrix], axis=1)
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {
            "observer": self.kind,
            "spec": spec_to_state(self.spec),
            "options": {"candidates": self.candidates, "min_fraction": self.min_fraction},
            "matrix": None if self.matrix is None else self.matrix.copy(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PerChannelMSEWeightObserver:
        check_state_kind(state, cls.kind)
        observer = cls(spec_from_state(state["spec"]), **state["options"])
        if state["matrix"] is not None:
            observer.matrix = np.array(state["matrix"], dtype=np.float32)
        return observer

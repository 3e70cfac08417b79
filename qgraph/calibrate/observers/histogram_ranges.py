"""Ranges derived from a histogram: entropy (KL divergence), percentile and MSE.

All three work on a :class:`HistogramView` (counts of equal-width bins, the first edge, the width and the exact
observed extremes) and return ``(low, high)``; the observer clamps the result to the observed [minimum, maximum].
"Magnitude histogram" below means bins of |x|: the negative side folded onto the positive one (bin k holds
k·w ≤ |x| < (k+1)·w). Data that are all ≥ 0 (or all ≤ 0) use only their side, so a ReLU output gets every bin.

Entropy (KL), after the classic TensorRT calibration
----------------------------------------------------
On the magnitude histogram h (one side for one-signed data) with ``L`` quantization levels — ``levels // 2`` (128 for
int8) for symmetric specs and signed data, all ``levels`` (256 for uint8) for an asymmetric spec on one-signed data —
every threshold of i bins, L ≤ i ≤ (last occupied bin + 1), is scored:

    P = h[0:i] with the clipped mass Σ_{j≥i} h_j added to P[i-1]                (reference: what clipping produces)
    Q = h[0:i] merged into L groups (group g = bins [⌊g·i/L⌋, ⌊(g+1)·i/L⌋)), each group's mass spread evenly over
        its non-empty bins                                                        (candidate: what L levels keep)
    KL(P‖Q) = Σ_j p_j log(p_j / q_j),   p = P / ΣP,  q = Q / ΣQ

Bin 0 (|x| < w) is left out first: its values quantize to zero whatever the threshold, and the exact zeros of
a ReLU output (often half the tensor) would otherwise dominate the divergence through the first group, pulling the
threshold down until that group is a single bin. The threshold ``i·w`` with the smallest KL wins (the largest i among
exact ties). Q spreads each group's mass over the bins where P is non-zero, so the clipped mass in P[i-1] gets its
group's share; when that whole group of h is empty, q[i-1] is smoothed to 1e-4 instead of 0 (an infinite divergence
would forbid every threshold between the bulk and a few far outliers). Everything is vectorised over all thresholds with
cumulative sums: per group, Σ_j P_j log Q_j = (Σ_g P) · log(S_g / n_g) with S_g the group mass of h and n_g its
non-empty bins of P.

Percentile
----------
The p-th percentile (default 99.999) with linear interpolation inside the bin: of |x| for symmetric specs, range
(-T, T); of x at both tails for asymmetric specs, range (percentile(100 - p), percentile(p)).

MSE
---
Expected squared error of fake quantization, assuming values are uniform inside each bin (end bins are cut to the
observed extremes). With scale s, zero point z and representable interval [c_lo, c_hi] = [(qmin - z)·s, (qmax - z)·s],
the error of x is the rounding error inside and (x - c)² beyond the clip point c. Its antiderivative is closed form:

    G(x) = m·s³/12 + r³/3,  m = round(x / s), r = x - m·s            (∫₀ˣ (t - s·round(t/s))² dt)
    A(x) = G(clamp(x, c_lo, c_hi)) + [x > c_hi]·(x - c_hi)³/3 + [x < c_lo]·(x - c_lo)³/3

so a bin [a, b) with count n contributes n·(A(b) - A(a)) / (b - a): rounding noise inside, clipping error outside.
Candidates: symmetric specs try T = amax·k/K, k = 1..K (K = mse_candidates); asymmetric specs first shrink both ends
together, (α·min, α·max), then refine the upper and the lower end alone on the same grid. The full range is always a
candidate, so the result is never worse than min-max under this model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from qgraph.quant.spec import QuantSpec, compute_quant_params

logger = logging.getLogger(__name__)

_TIE_TOLERANCE = 1e-12

#: Probability given to a bin where P holds only clipped mass and Q holds none (as in the classic implementation).
_SMOOTHING = 1e-4
#: Candidate thresholds evaluated together in the entropy search (256 × 256 float64 temporaries: 512 KB each).
_THRESHOLD_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class HistogramView:
    """Equal-width bins [first_edge + k·width, first_edge + (k+1)·width) and the exact observed extremes."""

    counts: np.ndarray
    first_edge: float
    width: float
    minimum: float
    maximum: float

    @property
    def zero_index(self) -> int:
        """Index of the bin [0, width) (first_edge is a non-positive multiple of width)."""
        return int(round(-self.first_edge / self.width))

    def positive_side(self) -> np.ndarray:
        return self.counts[self.zero_index :]

    def negative_side(self) -> np.ndarray:
        """Negative bins mirrored: entry k holds -(k+1)·w ≤ x < -k·w."""
        return self.counts[: self.zero_index][::-1]

    def magnitudes(self) -> np.ndarray:
        positive, negative = self.positive_side(), self.negative_side()
        folded = positive.copy()
        folded[: negative.size] += negative
        return folded


# ------------------------------------------------------------------------------------------------------ entropy
@functools.lru_cache(maxsize=32)
def _group_bounds(levels: int, block_index: int) -> tuple[np.ndarray, np.ndarray]:
    """First and past-the-end bins of each of ``levels`` groups, for the thresholds of row block ``block_index``
    (thresholds ``levels + block_index·_THRESHOLD_BLOCK`` onwards): the same for every histogram, and the integer
    divisions that give them took a third of a search's time (read-only int32, 256 KB each)."""
    block = np.arange(_THRESHOLD_BLOCK, dtype=np.int64) + levels + block_index * _THRESHOLD_BLOCK
    groups = np.arange(levels, dtype=np.int64)
    starts = ((groups[None, :] * block[:, None]) // levels).astype(np.int32)
    ends = (((groups[None, :] + 1) * block[:, None]) // levels).astype(np.int32)
    starts.flags.writeable = False
    ends.flags.writeable = False
    return starts, ends


def kl_threshold_bins(histogram: np.ndarray, levels: int) -> int:
    """Number of bins i (threshold i·w) minimising KL(P‖Q) for ``levels`` quantization levels."""
    histogram = np.array(histogram, dtype=np.float64)
    # Values in [0, w) quantize to zero at every candidate; dropping them keeps the exact zeros of ReLU outputs
    # (often half the tensor) from dominating the divergence through the first group.
    histogram[0] = 0.0
    occupied = np.flatnonzero(histogram)
    if occupied.size == 0:
        return 0
    top = int(occupied[-1]) + 1
    if top <= levels:
        return top
    total = histogram.sum()
    cumulative = np.concatenate(([0.0], np.cumsum(histogram)))
    cumulative_nonempty = np.concatenate(([0], np.cumsum(histogram > 0, dtype=np.int64)))
    with np.errstate(divide="ignore", invalid="ignore"):
        h_log_h = np.where(histogram > 0, histogram * np.log(np.where(histogram > 0, histogram, 1.0)), 0.0)
    cumulative_h_log_h = np.concatenate(([0.0], np.cumsum(h_log_h)))

    thresholds = np.arange(levels, top + 1, dtype=np.int64)
    # Candidates go in row blocks, each row computed as before: the (rows × levels) temporaries stay in the caches
    # and the allocator's heap (a 2048-bin ReLU histogram here: 5.7 ms in one piece, 4.7 ms in blocks).
    divergences = []
    for block_start in range(0, thresholds.size, _THRESHOLD_BLOCK):
        block = thresholds[block_start : block_start + _THRESHOLD_BLOCK]
        starts, ends = _group_bounds(levels, block_start // _THRESHOLD_BLOCK)
        starts, ends = starts[: block.size], ends[: block.size]
        group_mass = cumulative[ends] - cumulative[starts]  # S_g: mass of h in the group (Q's mass)
        group_support = cumulative_nonempty[ends] - cumulative_nonempty[starts]  # n_g: non-empty bins of P
        kept = cumulative[block]
        clipped = total - kept
        last = histogram[block - 1]
        spike = (clipped > 0) & (last == 0)  # P[i-1] holds only clipped mass: one more bin in P's support
        group_support[:, -1] += spike
        reference_mass = group_mass.copy()  # Σ_{j in g} P_j
        reference_mass[:, -1] += clipped
        last_with_clipped = last + clipped
        with np.errstate(divide="ignore", invalid="ignore"):
            sum_p_log_p = (
                cumulative_h_log_h[block - 1]
                + np.where(last_with_clipped > 0, last_with_clipped * np.log(np.maximum(last_with_clipped, 1.0)), 0.0)
            ) / total - np.log(total)
            log_q = np.log(group_mass / np.maximum(group_support, 1)) - np.log(np.maximum(kept, 1.0))[:, None]
            sum_p_log_q = np.where(group_mass > 0, reference_mass * log_q, 0.0).sum(axis=1) / total
            # Q has no mass where only clipped values landed: smooth it to _SMOOTHING, not an infinite divergence.
            sum_p_log_q += np.where(spike & (group_mass[:, -1] == 0), clipped / total * np.log(_SMOOTHING), 0.0)
            divergence = sum_p_log_p - sum_p_log_q
        divergences.append(np.where(kept == 0, np.inf, divergence))
    divergence = np.concatenate(divergences)
    best = float(divergence.min())
    if not np.isfinite(best):
        return top
    chosen = int(thresholds[np.flatnonzero(divergence <= best + _TIE_TOLERANCE)[-1]])
    logger.debug("entropy calibration: %d of %d bins, KL %.3g", chosen, top, best)
    return chosen


def entropy_range(view: HistogramView, spec: QuantSpec) -> tuple[float, float]:
    one_sided_levels = spec.levels if not spec.symmetric else spec.levels // 2
    if view.minimum >= 0.0:
        threshold = kl_threshold_bins(view.positive_side(), one_sided_levels) * view.width
        return 0.0, threshold
    if view.maximum <= 0.0:
        threshold = kl_threshold_bins(view.negative_side(), one_sided_levels) * view.width
        return -threshold, 0.0
    threshold = kl_threshold_bins(view.magnitudes(), spec.levels // 2) * view.width
    return -threshold, threshold


# --------------------------------------------------------------------------------------------------- percentile
def histogram_quantile(counts: np.ndarray, first_edge: float, width: float, fraction: float) -> float:
    """Value below which ``fraction`` of the mass lies, interpolating linearly inside the bin."""
    cumulative = np.cumsum(counts, dtype=np.float64)
    target = fraction * cumulative[-1]
    index = min(int(np.searchsorted(cumulative, target, side="left")), counts.size - 1)
    before = cumulative[index - 1] if index > 0 else 0.0
    inside = (target - before) / counts[index] if counts[index] > 0 else 0.0
    return first_edge + (index + min(max(inside, 0.0), 1.0)) * width


def percentile_range(view: HistogramView, spec: QuantSpec, percentile: float) -> tuple[float, float]:
    fraction = percentile / 100.0
    if spec.symmetric:
        threshold = histogram_quantile(view.magnitudes(), 0.0, view.width, fraction)
        return -threshold, threshold
    low = histogram_quantile(view.counts, view.first_edge, view.width, 1.0 - fraction)
    high = histogram_quantile(view.counts, view.first_edge, view.width, fraction)
    return low, high


# ---------------------------------------------------------------------------------------------------------- mse
def _error_antiderivative(x: np.ndarray, scale: np.ndarray, clip_low: np.ndarray, clip_high: np.ndarray) -> np.ndarray:
    inside = np.clip(x, clip_low, clip_high)
    steps = np.rint(inside / scale)
    remainder = inside - steps * scale
    result = steps * scale**3 / 12.0 + remainder**3 / 3.0
    result += np.where(x > clip_high, (x - clip_high) ** 3 / 3.0, 0.0)
    result += np.where(x < clip_low, (x - clip_low) ** 3 / 3.0, 0.0)
    return result


def expected_squared_error(
    view: HistogramView, spec: QuantSpec, lows: np.ndarray, highs: np.ndarray
) -> np.ndarray:
    """Σ over bins of count · mean squared fake-quantization error, for each candidate range (lows[k], highs[k])."""
    params = compute_quant_params(
        spec.with_axis(0), np.asarray(lows, dtype=np.float64), np.asarray(highs, dtype=np.float64)
    )
    scale = params.scale.astype(np.float64)[:, None]
    zero_point = params.zero_point.astype(np.float64)[:, None]
    clip_low = (spec.qmin - zero_point) * scale
    clip_high = (spec.qmax - zero_point) * scale

    # A is evaluated once per bin edge of the occupied span (each inner edge closes one bin and opens the next);
    # edges are cut to the observed extremes, so the end bins' widths shrink to what the data cover.
    occupied = np.flatnonzero(view.counts)
    first, last = int(occupied[0]), int(occupied[-1]) + 1
    edges = np.clip(
        view.first_edge + np.arange(first, last + 1, dtype=np.float64) * view.width, view.minimum, view.maximum
    )
    weights = view.counts[first:last].astype(np.float64)
    widths = np.diff(edges)
    spread = widths > 0
    errors = np.zeros((scale.shape[0], weights.size))
    if spread.any():
        antiderivative = _error_antiderivative(edges[None, :], scale, clip_low, clip_high)
        errors[:, spread] = (antiderivative[:, 1:] - antiderivative[:, :-1])[:, spread] / widths[spread][None, :]
    point = ~spread & (weights > 0)
    if point.any():  # all of a bin's values at one point (the data's extremes meet inside it)
        points = edges[:-1][point][None, :]
        codes = np.clip(np.rint(points / scale) + zero_point, spec.qmin, spec.qmax)
        errors[:, point] = (points - (codes - zero_point) * scale) ** 2
    return np.maximum(errors, 0.0) @ weights


def _best(errors: np.ndarray) -> int:
    """Index of the smallest error, preferring later (wider) candidates among ties."""
    best = errors.min()
    return int(np.flatnonzero(errors <= best * (1.0 + 1e-9) + 1e-300)[-1])


def mse_range(view: HistogramView, spec: QuantSpec, candidates: int) -> tuple[float, float]:
    low, high = min(view.minimum, 0.0), max(view.maximum, 0.0)
    fractions = np.arange(1, candidates + 1, dtype=np.float64) / candidates
    if spec.symmetric:
        magnitude = max(-low, high)
        thresholds = magnitude * fractions
        lows, highs = np.maximum(low, -thresholds), np.minimum(high, thresholds)
        chosen = _best(expected_squared_error(view, spec, lows, highs))
        return float(lows[chosen]), float(highs[chosen])
    lows, highs = low * fractions, high * fractions
    chosen = _best(expected_squared_error(view, spec, lows, highs))
    best_low, best_high = float(lows[chosen]), float(highs[chosen])
    if high > 0:
        highs = high * fractions
        errors = expected_squared_error(view, spec, np.full_like(highs, best_low), highs)
        best_high = float(highs[_best(errors)])
    if low < 0:
        lows = low * fractions
        errors = expected_squared_error(view, spec, lows, np.full_like(lows, best_high))
        best_low = float(lows[_best(errors)])
    return best_low, best_high

"""Numpy reference implementations of ONNX QuantizeLinear / DequantizeLinear and fake quantization.

These follow the ONNX operator definitions bit for bit (checked against onnxruntime in tests/quant), so tests of
passes can compare a quantized graph with them::

    QuantizeLinear:    q = saturate(round_half_even(x / scale) + zero_point)
    DequantizeLinear:  x̂ = (q - zero_point) · scale
    fake_quantize:     x̂ = DequantizeLinear(QuantizeLinear(x))

* ``x / scale`` is an IEEE float32 division (not a multiplication by 1/scale), like onnxruntime's MLAS kernels.
* ``saturate`` clamps to the storage type ([-128, 127] for int8, [-8, 7] for int4), as ONNX does. The spec's
  narrower ``[qmin, qmax]`` (narrow or reduced range) is *not* applied unless ``clip_to_spec=True``, which is what
  a QAT FakeQuant with ``quant_min=qmin, quant_max=qmax`` computes.
* Per-channel parameters broadcast along ``params.axis`` (negative axes count from the end).
* ONNX leaves NaN inputs undefined; here NaN quantizes to the zero point (so it dequantizes to 0).
* Dequantization subtracts in int32 and multiplies in float32: ``float32(q - zero_point) · scale``.

``quantization_step`` is the distance between adjacent representable values (the scale): rounding moves a value that
is not clipped by at most half of it. ``sqnr_db`` is the signal-to-quantization-noise ratio
``10·log10(Σ reference² / Σ (reference - approximation)²)`` computed in float64.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from qgraph.quant.spec import QuantParams

logger = logging.getLogger(__name__)


def _broadcast_shape(params: QuantParams, ndim: int) -> tuple[int, ...] | None:
    """Shape that broadcasts per-channel parameters against a tensor of rank ``ndim`` (None for per-tensor)."""
    if params.axis is None:
        return None
    axis = params.axis
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    axis %= ndim
    shape = [1] * ndim
    shape[axis] = params.scale.shape[0]
    return tuple(shape)


def _aligned(params: QuantParams, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = _broadcast_shape(params, x.ndim)
    if shape is None or params.axis is None:  # (the second test only tells mypy: per-tensor has no shape)
        return params.scale, params.zero_point
    axis = params.axis % x.ndim
    if x.shape[axis] != params.scale.shape[0]:
        raise ValueError(
            f"tensor has {x.shape[axis]} channels on axis {params.axis} but parameters have {params.scale.shape[0]}"
        )
    return params.scale.reshape(shape), params.zero_point.reshape(shape)


def quantize(x: np.ndarray, params: QuantParams, *, clip_to_spec: bool = False) -> np.ndarray:
    """ONNX QuantizeLinear: codes in ``params.spec.storage_dtype``."""
    x = np.asarray(x, dtype=np.float32)
    scale, zero_point = _aligned(params, x)
    spec = params.spec
    low, high = (spec.qmin, spec.qmax) if clip_to_spec else spec.storage_range
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.asarray(np.divide(x, scale, dtype=np.float32))
        np.rint(scaled, out=scaled)
        scaled += zero_point.astype(np.float32)
        np.clip(scaled, low, high, out=scaled)
    not_a_number = np.isnan(scaled)
    if not_a_number.any():
        scaled = np.where(not_a_number, np.broadcast_to(zero_point, scaled.shape).astype(np.float32), scaled)
    return scaled.astype(spec.storage_dtype)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear: float32 values ``(q - zero_point) · scale``."""
    q = np.asarray(q)
    scale, zero_point = _aligned(params, q)
    difference = q.astype(np.int32) - zero_point.astype(np.int32)
    return difference.astype(np.float32) * scale


def fake_quantize(x: np.ndarray, params: QuantParams, *, clip_to_spec: bool = False) -> np.ndarray:
    """Quantize then dequantize: the float32 value a QDQ pair produces."""
    return dequantize(quantize(x, params, clip_to_spec=clip_to_spec), params)


def quantization_step(params: QuantParams, ndim: int | None = None) -> np.ndarray:
    """The spacing of the quantization grid (the scale), as float32.

    With ``ndim`` and per-channel parameters the result is reshaped to broadcast against a tensor of that rank, so
    ``np.abs(a - b) <= quantization_step(params, a.ndim)`` compares element-wise.
    """
    if ndim is None:
        return params.scale.copy()
    shape = _broadcast_shape(params, ndim)
    return params.scale.copy() if shape is None else params.scale.reshape(shape).copy()


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in decibels: +inf for an exact match, -inf for a zero signal with noise."""
    reference = np.asarray(reference, dtype=np.float64)
    approximation = np.asarray(approximation, dtype=np.float64)
    if reference.shape != approximation.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs approximation {approximation.shape}")
    signal = float(np.sum(np.square(reference)))
    noise = float(np.sum(np.square(reference - approximation)))
    if not (np.isfinite(signal) and np.isfinite(noise)):
        raise ValueError("sqnr_db needs finite inputs")
    return power_ratio_db(signal, noise)


def power_ratio_db(signal: float, noise: float) -> float:
    """``10·log10(signal / noise)`` for summed squared signal and noise: +inf without noise, -inf for noise on a
    zero signal or infinite noise."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0 or math.isinf(noise):
        return float("-inf")
    return 10.0 * math.log10(signal / noise)

"""Quantization specs (what a tensor's integer format is) and parameters (the scale and zero point chosen for it).

A :class:`QuantSpec` describes the integer grid: ``bits`` and ``signed`` give the storage type (int4/uint4, int8/uint8,
int16/uint16), ``symmetric`` fixes the zero point, ``axis`` selects per-channel parameters, and two options shrink the
grid:

* ``narrow_range`` drops the most negative code of a signed type (int8 → [-127, 127], as TensorRT uses), so that the
  grid is symmetric around zero; for an unsigned type it drops code 0 (uint8 → [1, 255]).
* ``reduce_range`` uses one bit less (int8 → [-64, 63], uint8 → [0, 127]). onnxruntime's u8s8 kernels on x86 CPUs
  without VNNI multiply with VPMADDUBSW, which adds two u8·s8 products into a saturating int16: 255·128·2 overflows
  32767 while 255·64·2 does not, so 7-bit weights avoid the saturation.

Derived bounds, with ``b = bits - 1`` when ``reduce_range`` else ``b = bits``::

    signed:   qmin = -2^(b-1) (+1 when narrow_range),  qmax = 2^(b-1) - 1
    unsigned: qmin = 0        (+1 when narrow_range),  qmax = 2^b - 1

:class:`QuantParams` holds ``scale`` (float32) and ``zero_point`` (storage dtype), scalars or one per channel. The real
value of a code ``q`` is ``(q - zero_point) · scale``.

:func:`compute_quant_params` turns an observed range into parameters. All arithmetic is done in float64; the scale is
rounded to float32 once and the zero point is derived from that float32 scale::

    lo = min(minimum, 0), hi = max(maximum, 0)              # the range always contains 0
    symmetric:  zero_point = ceil((qmin + qmax) / 2)         # 0 for signed types, 128 for uint8, 8 for uint4
                scale      = max(|lo|, |hi|) / ((qmax - qmin) / 2)
    asymmetric: scale      = (hi - lo) / (qmax - qmin)
                zero_point = clamp(round_half_even(qmin - lo / scale), qmin, qmax)

Because ``lo <= 0 <= hi``, real zero is the code ``zero_point`` exactly, which zero padding and ReLU rely on.

Degenerate and extreme ranges never give a zero, subnormal, infinite or NaN scale:

* a zero-width range (all-zero tensor, or no data observed) gets ``scale = 1.0``: every scale represents 0 exactly,
  and 1.0 keeps products of scales (bias scale = input scale · weight scale) well conditioned;
* a positive width whose scale would be below :data:`MINIMUM_SCALE` (``2**-32`` ≈ 2.3e-10, a power of two so that it
  is exact) is raised to it: ``1/scale`` is finite and the product of three such scales is still a normal float32;
* bounds beyond the float32 range are clipped to ±float32 max first, and the width is computed in float64, so that a
  range like [-3.4e38, 3.4e38] yields a finite scale;
* non-finite bounds are refused with :class:`ValueError` (observers drop NaN and ±Inf before they get here).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from onnx import TensorProto

logger = logging.getLogger(__name__)

#: Smallest scale compute_quant_params returns for a non-empty range (a power of two, exact in float32).
MINIMUM_SCALE = 2.0**-32

#: Scale chosen when the range has zero width (the tensor is exactly zero, or nothing was observed).
ZERO_RANGE_SCALE = 1.0

_FLOAT32_MAX = float(np.finfo(np.float32).max)

_SUPPORTED_BITS = (4, 8, 16)

_STORAGE_DTYPES: dict[tuple[int, bool], np.dtype] = {
    (4, True): np.dtype(np.int8),
    (4, False): np.dtype(np.uint8),
    (8, True): np.dtype(np.int8),
    (8, False): np.dtype(np.uint8),
    (16, True): np.dtype(np.int16),
    (16, False): np.dtype(np.uint16),
}

_ONNX_TYPES = {
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
}


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The lowest and highest ``bits``-bit integer: ``[-2^(b-1), 2^(b-1) - 1]`` signed, ``[0, 2^b - 1]`` unsigned."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """The integer format of one tensor: storage type, zero-point policy, granularity and range options."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    narrow_range: bool = False
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.bits not in _SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits must be one of {_SUPPORTED_BITS}, got {self.bits!r}")
        if self.axis is not None and not isinstance(self.axis, (int, np.integer)):
            raise ValueError(f"QuantSpec.axis must be an int or None, got {self.axis!r}")
        if self.reduce_range and self.bits == 4:
            raise ValueError("QuantSpec.reduce_range is only defined for 8- and 16-bit types")

    # Named constructors for the common formats.
    @classmethod
    def int8(cls, **options: Any) -> QuantSpec:
        """Signed 8-bit, symmetric by default."""
        return cls(bits=8, signed=True, **options)

    @classmethod
    def uint8(cls, **options: Any) -> QuantSpec:
        """Unsigned 8-bit, asymmetric by default."""
        options.setdefault("symmetric", False)
        return cls(bits=8, signed=False, **options)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def effective_bits(self) -> int:
        return self.bits - 1 if self.reduce_range else self.bits

    @property
    def qmin(self) -> int:
        lowest = integer_range(self.effective_bits, self.signed)[0]
        return lowest + 1 if self.narrow_range else lowest

    @property
    def qmax(self) -> int:
        return integer_range(self.effective_bits, self.signed)[1]

    @property
    def levels(self) -> int:
        """Number of codes in [qmin, qmax]."""
        return self.qmax - self.qmin + 1

    @property
    def storage_range(self) -> tuple[int, int]:
        """Lowest and highest value of the storage type (what ONNX QuantizeLinear saturates to)."""
        return integer_range(self.bits, self.signed)

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype holding codes (4-bit codes live in int8/uint8 arrays)."""
        return _STORAGE_DTYPES[(self.bits, self.signed)]

    @property
    def onnx_type(self) -> int:
        """The ONNX ``TensorProto`` element type of the quantized tensor."""
        return _ONNX_TYPES[(self.bits, self.signed)]

    @property
    def symmetric_zero_point(self) -> int:
        """Zero point of the symmetric format: ceil((qmin + qmax) / 2)."""
        return (self.qmin + self.qmax + 1) // 2

    def with_axis(self, axis: int | None) -> QuantSpec:
        return dataclasses.replace(self, axis=axis)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantParams:
    """Scale (float32) and zero point (storage dtype) of one tensor; shape () per tensor, (channels,) per channel."""

    scale: np.ndarray
    zero_point: np.ndarray
    spec: QuantSpec

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale, dtype=np.float32)
        zero_point = np.asarray(self.zero_point)
        low, high = self.spec.storage_range
        if np.any(zero_point < low) or np.any(zero_point > high):
            raise ValueError(f"zero_point outside the storage range [{low}, {high}]: {zero_point!r}")
        if zero_point.dtype != self.spec.storage_dtype:
            if not np.array_equal(zero_point, np.round(zero_point)):
                raise ValueError(f"zero_point must hold integers, got {zero_point!r}")
            zero_point = zero_point.astype(self.spec.storage_dtype)
        if scale.shape != zero_point.shape:
            raise ValueError(f"scale shape {scale.shape} differs from zero_point shape {zero_point.shape}")
        if self.spec.axis is None and scale.ndim != 0:
            raise ValueError(f"per-tensor parameters need a scalar scale, got shape {scale.shape}")
        if self.spec.axis is not None and scale.ndim != 1:
            raise ValueError(f"per-channel parameters need a 1-D scale, got shape {scale.shape}")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError(f"scale must be finite and positive, got {scale!r}")
        scale.setflags(write=False)
        zero_point.setflags(write=False)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    @property
    def axis(self) -> int | None:
        return self.spec.axis

    def __repr__(self) -> str:
        return f"QuantParams(scale={self.scale!r}, zero_point={self.zero_point!r}, spec={self.spec!r})"


def _as_bounds(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return np.clip(array, -_FLOAT32_MAX, _FLOAT32_MAX)


def compute_quant_params(spec: QuantSpec, minimum: Any, maximum: Any) -> QuantParams:
    """Scale and zero point for the observed range [minimum, maximum] (scalars, or 1-D arrays per channel).

    See the module docstring for the formulas and the handling of degenerate ranges.
    """
    lower = np.minimum(_as_bounds(minimum, "minimum"), 0.0)
    upper = np.maximum(_as_bounds(maximum, "maximum"), 0.0)
    if lower.shape != upper.shape:
        raise ValueError(f"minimum shape {lower.shape} differs from maximum shape {upper.shape}")
    if spec.axis is None and lower.ndim != 0:
        raise ValueError(f"per-tensor spec needs scalar minimum/maximum, got shape {lower.shape}")
    if spec.axis is not None and lower.ndim != 1:
        raise ValueError(f"per-channel spec (axis={spec.axis}) needs 1-D minimum/maximum, got shape {lower.shape}")

    code_span = float(spec.qmax - spec.qmin)
    if spec.symmetric:
        magnitude = np.maximum(-lower, upper)
        raw_scale = magnitude / (code_span / 2.0)
    else:
        raw_scale = (upper - lower) / code_span
    scale64 = np.where(raw_scale > 0, np.maximum(raw_scale, MINIMUM_SCALE), ZERO_RANGE_SCALE)
    scale = scale64.astype(np.float32)
    # Rounding to float32 cannot overflow here (width ≤ 2·float32 max, span ≥ 14), but stay defensive.
    scale = np.where(np.isfinite(scale), scale, np.float32(_FLOAT32_MAX)).astype(np.float32)

    if spec.symmetric:
        zero_point = np.full(scale.shape, spec.symmetric_zero_point, dtype=np.float64)
    else:
        zero_point = np.rint(spec.qmin - lower / scale.astype(np.float64))
        zero_point = np.clip(zero_point, spec.qmin, spec.qmax)
    if np.any(raw_scale < MINIMUM_SCALE) and np.any(raw_scale > 0):
        logger.debug("range narrower than the scale floor %g; scale raised to it", MINIMUM_SCALE)
    return QuantParams(scale=scale, zero_point=zero_point.astype(spec.storage_dtype), spec=spec)


def representable_range(params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """Real values of the codes qmin and qmax: the interval that quantization does not clip."""
    scale = params.scale.astype(np.float64)
    zero_point = params.zero_point.astype(np.float64)
    return (params.spec.qmin - zero_point) * scale, (params.spec.qmax - zero_point) * scale


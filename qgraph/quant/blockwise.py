"""Block-wise quantization of a weight ``W [K, N]`` along its input axis, and its packed storage.

(Used by weight-only LLM quantization, :mod:`qgraph.weight_only`.)

**Blocks.** With block size B, column n of W is cut into ``n_blocks = ceil(K / B)`` blocks of B consecutive rows;
block j holds ``W[jB : (j+1)B, n]``. Each block has its own scale ``s[j, n]`` (and zero point ``z[j, n]``):

- asymmetric, codes ``q ∈ [0, 2^b − 1]``: with ``lo = min(0, min block)``, ``hi = max(0, max block)`` (times a
  clipping ratio r ≤ 1), ``s = (hi − lo) / (2^b − 1)``, ``z = clamp(round(−lo / s), 0, 2^b − 1)``;
- symmetric, codes ``q ∈ [−2^(b−1), 2^(b−1) − 1]``, no zero point: ``s = max(hi / (2^(b−1) − 1), −lo / 2^(b−1))``,
  so the block's largest positive value lands on 7 and its most negative on −8 or inside (4 bits);

``q = clamp(round(w / s) + z, qmin, qmax)`` and ``ŵ = s · (q − z)``. A zero block gets s = 1 (all codes z).

**K not a multiple of B.** The last block is partial: it is quantized from its own K mod B rows only. The stored
forms that need whole blocks (MatMulNBits) pad those rows with the code z, i.e. with weights that dequantize to
exactly 0, which multiply activation columns that do not exist: padding never changes a real weight's code.

**MatMulNBits storage** (``com.microsoft.MatMulNBits``, 4 bits): codes are unsigned (a symmetric code is stored as
``q + 8``, and no zero-point input means z = 8); ``B [N, n_blocks, B/2]`` uint8 holds column n's codes in K order,
two per byte, the even index in the low nibble; ``scales [N · n_blocks]`` float32, column-major by block
(``scales[n · n_blocks + j] = s[j, n]``); ``zero_points [N · ceil(n_blocks / 2)]`` uint8, each column's zero points
packed two per byte the same way, a column's row padded to a whole byte.

**DequantizeLinear storage** (opset 21, blocked): codes ``[K, N]`` int4 (symmetric) or uint4 (asymmetric, with
uint4 zero points ``[n_blocks, N]``), ``scales [n_blocks, N]``, ``axis = 0``, ``block_size = B`` (the last block may
be partial); 8 bits the same in int8/uint8.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qgraph.errors import QGraphError
from qgraph.quant.spec import integer_range

MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256


def check_block_size(block_size: int) -> None:
    """Refuse a block size that is not a power of two in [16, 256] (the sizes MatMulNBits supports)."""
    if (not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)):
        raise QGraphError(f"--block-size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} "
                          f"(16, 32, 64, 128 or 256), got {block_size}")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """How a weight is cut and rounded."""

    bits: int = 4
    block_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_block_size(self.block_size)

    @property
    def qmin(self) -> int:
        """Lowest code: signed codes when symmetric, unsigned ones with a zero point otherwise."""
        return integer_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return integer_range(self.bits, self.symmetric)[1]


@dataclasses.dataclass(frozen=True)
class BlockQuantizedWeight:
    """Codes ``[K, N]`` (int32; signed when symmetric), scales ``[n_blocks, N]`` and zero points (None when
    symmetric) of a weight quantized by :func:`quantize`."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    spec: BlockSpec

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.codes.shape
        return rows, columns

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[0]

    def dequantize(self) -> np.ndarray:
        """``ŵ = s · (q − z)`` as float32 ``[K, N]``."""
        rows = self.codes.shape[0]
        scales = np.repeat(self.scales, self.spec.block_size, axis=0)[:rows]
        codes = self.codes.astype(np.float32)
        if self.zero_points is not None:
            codes = codes - np.repeat(self.zero_points, self.spec.block_size, axis=0)[:rows].astype(np.float32)
        return (codes * scales).astype(np.float32)


def n_blocks(rows: int, block_size: int) -> int:
    return -(-rows // block_size)


def block_view(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``weight [K, N]`` as ``[n_blocks, B, N]``, the missing rows of the last block zero (zeros quantize to
    themselves exactly, so they change neither range nor error)."""
    rows, columns = weight.shape
    padded = n_blocks(rows, block_size) * block_size
    if padded != rows:
        weight = np.concatenate([weight, np.zeros((padded - rows, columns), weight.dtype)], axis=0)
    return weight.reshape(-1, block_size, columns)


def parameters_from_range(low: np.ndarray, high: np.ndarray, spec: BlockSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales and zero points (None when symmetric) for ranges ``[low, high]`` (any shape; 0 inside the range)."""
    low = np.minimum(low, 0.0).astype(np.float64)
    high = np.maximum(high, 0.0).astype(np.float64)
    if spec.symmetric:
        scale = np.maximum(high / spec.qmax, -low / -spec.qmin)
        return np.where(scale > 0, scale, 1.0).astype(np.float32), None
    scale = (high - low) / spec.qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.round(-low / scale), 0, spec.qmax).astype(np.int32)
    return scale, zero


def round_codes(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, spec: BlockSpec) -> np.ndarray:
    """``clamp(round(w / s) + z, qmin, qmax)`` elementwise (broadcasting), int32."""
    codes = np.round(weight / scale)
    if zero is not None:
        codes = codes + zero
    return np.clip(codes, spec.qmin, spec.qmax).astype(np.int32)


def fake_quantize(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, spec: BlockSpec) -> np.ndarray:
    """``s · (q − z)`` with q from :func:`round_codes`."""
    codes = round_codes(weight, scale, zero, spec).astype(np.float32)
    if zero is not None:
        codes = codes - zero
    return codes * scale


def quantize(weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
             spec: BlockSpec) -> BlockQuantizedWeight:
    """Round ``weight [K, N]`` with the given per-block parameters ``[n_blocks, N]``."""
    rows = weight.shape[0]
    blocks = block_view(np.asarray(weight, np.float32), spec.block_size)
    zero = zero_points[:, None, :] if zero_points is not None else None
    codes = round_codes(blocks, scales[:, None, :], zero, spec).reshape(-1, weight.shape[1])[:rows]
    return BlockQuantizedWeight(codes, scales.astype(np.float32), zero_points, spec)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit codes ``[..., 2m]`` as bytes ``[..., m]``: even index low nibble, odd index high nibble."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def unsigned_codes(weight: BlockQuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Codes and zero points ``[n_blocks, N]`` in the unsigned form MatMulNBits reads (symmetric: ``q + 2^(b−1)``,
    zero point ``2^(b−1)``)."""
    if weight.zero_points is None:
        offset = 1 << (weight.spec.bits - 1)
        return weight.codes + offset, np.full(weight.scales.shape, offset, np.int32)
    return weight.codes, weight.zero_points


def pack_matmul_nbits(weight: BlockQuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``B [N, n_blocks, B/2]``, ``scales [N · n_blocks]`` and packed ``zero_points`` (None when symmetric) as
    MatMulNBits reads them (4 bits only; see the module docstring)."""
    if weight.spec.bits != 4:
        raise ValueError("MatMulNBits storage is written for 4-bit weights only")
    codes, zero_points = unsigned_codes(weight)
    rows, columns = codes.shape
    count, block = weight.n_blocks, weight.spec.block_size
    padded = np.empty((count * block, columns), np.int32)
    padded[:rows] = codes
    padded[rows:] = zero_points[-1]  # padding rows dequantize to exactly 0
    by_column = padded.T.reshape(columns, count, block)
    packed = _pack_nibbles(by_column)
    scales = np.ascontiguousarray(weight.scales.T).reshape(-1).astype(np.float32)
    if weight.zero_points is None:
        return packed, scales, None
    zero_rows = zero_points.T  # [N, n_blocks]
    if count % 2:
        zero_rows = np.concatenate([zero_rows, np.zeros((columns, 1), np.int32)], axis=1)
    return packed, scales, _pack_nibbles(zero_rows).reshape(-1)


def dequantize_matmul_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, rows: int,
                            block_size: int) -> np.ndarray:
    """The float ``[K, N]`` weight that MatMulNBits computes with, read back from its packed inputs (reference)."""
    columns, count, _ = packed.shape
    codes = _unpack_nibbles(packed).astype(np.float32)  # [N, n_blocks, B]
    if zero_points is None:
        zero = np.full((columns, count), 8.0, np.float32)
    else:
        zero = _unpack_nibbles(zero_points.reshape(columns, -1))[:, :count].astype(np.float32)
    values = (codes - zero[:, :, None]) * scales.reshape(columns, count)[:, :, None]
    return values.reshape(columns, count * block_size)[:, :rows].T

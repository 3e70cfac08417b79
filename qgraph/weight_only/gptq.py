"""GPTQ (Frantar et al., 2022): rounding with second-order error compensation, per layer.

For a layer ``y = x·W`` (W ``[K, N]``) and calibration inputs X ``[n, K]`` (every token of every prompt), the
output error of a rounded weight Ŵ is ``‖X(W − Ŵ)‖²_F = Σ_n (w_n − ŵ_n)ᵀ (XᵀX) (w_n − ŵ_n)``: each column is an
independent quadratic problem with the Hessian ``H = 2XᵀX``.

**Streaming Hessian.** ``H = 2 Σ_batches X_bᵀ X_b``, with ``X_b`` one batch's inputs reshaped to ``[tokens, K]``:
:class:`HessianAccumulator` keeps the K×K sum (float64) and the token count, memory O(K²) per layer whatever the
number of samples; it equals the batch formula on the concatenated X exactly (up to float addition order).

**Algorithm.** Rows (inputs) are rounded one at a time. Rounding row i leaves the error ``e = (w_i − ŵ_i) / U_ii``
(U the upper Cholesky factor of H⁻¹, ``H⁻¹ = UᵀU``), compensated by the optimal update of the rows not yet rounded,
``W[i:] −= U[i, i:]ᵀ e`` (the OBS update, written with the Cholesky rows so it never re-inverts H).

- *dampening*: ``H += λ·mean(diag H)·I`` (λ = 0.01) keeps H⁻¹ well conditioned; an input that never fires
  (``H_ii = 0``) gets ``H_ii = 1`` and a zero weight row.
- *act-order*: rows are rounded in order of decreasing ``H_ii`` (the most active inputs first, while the most rows
  remain to absorb their error); the block parameters are then computed on the stored blocks of the original W
  before any update ("static groups"), so the codes keep the storage layout and need no permutation index.
- *block parameters* without act-order: a block's scale and zero point are computed when its first row is reached,
  from the block's current (already error-compensated) weights.
- *lazy batch updates*: the update of the rows beyond the current batch of ``lazy_batch`` rows is deferred and
  applied once per batch as one matrix product ``W[i2:] −= U[i1:i2, i2:]ᵀ E`` (E the batch's errors), which is
  the same arithmetic as the row-by-row updates, reordered.

**The factor, once per layer input.** U depends only on H (dampened, permuted), so :func:`factor_hessian`
computes it once for every layer reading one input (q, k and v; gate and up) and every column slice of a wide
weight (:class:`HessianFactor`). It never forms H⁻¹: with R the reversal permutation and ``R H R = L Lᵀ``
(Cholesky), ``H⁻¹ = R L⁻ᵀ L⁻¹ R``, and ``U = R L⁻¹ R`` is upper triangular with a positive diagonal, so it *is* the
Cholesky factor of H⁻¹ (which is unique). Memory: the K×K float64 working arrays never overlap by more than the
triangular inversion needs, and the caller's accumulated ``XᵀX`` is read, not copied (the factor 2 of H is applied
to the permuted copy).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from qgraph.quant.blockwise import BlockQuantizedWeight, BlockSpec, block_view, quantize, round_codes
from qgraph.weight_only.rtn import block_parameters

logger = logging.getLogger(__name__)

#: Columns of ``XᵀX`` computed per product when a batch is added (bounds the temporary to K × this).
ADD_COLUMNS = 512


class HessianAccumulator:
    """``H = 2 Σ XᵀX`` over streamed batches of layer inputs ``[..., K]`` (float64), with the token count and the
    mean absolute input per channel (AWQ's statistic)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sum_outer = np.zeros((size, size), np.float64)
        self.sum_absolute = np.zeros(size, np.float64)
        self.count = 0

    def add(self, inputs: np.ndarray) -> None:
        rows = np.asarray(inputs).reshape(-1, self.size).astype(np.float64)
        for start in range(0, self.size, ADD_COLUMNS):  # a K × ADD_COLUMNS product at a time, never a K×K one
            self.sum_outer[:, start:start + ADD_COLUMNS] += rows.T @ rows[:, start:start + ADD_COLUMNS]
        self.sum_absolute += np.abs(rows).sum(axis=0)
        self.count += rows.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        """``2 XᵀX`` over everything added."""
        return 2.0 * self.sum_outer

    @property
    def mean_absolute(self) -> np.ndarray:
        return self.sum_absolute / max(self.count, 1)


@dataclasses.dataclass(frozen=True)
class HessianFactor:
    """GPTQ's view of one layer input's Hessian: the rounding order, the dead inputs and U (permuted rows/columns)."""

    #: Row indices in rounding order (decreasing dampened ``H_ii`` with act-order, else 0..K-1).
    order: np.ndarray
    #: Inputs that never fire (``H_ii = 0``): their weight rows are zeroed.
    dead: np.ndarray
    #: U, upper triangular, ``(H[order][:, order])⁻¹ = UᵀU``, float64 ``[K, K]``.
    upper: np.ndarray


def factor_hessian(hessian: np.ndarray, *, dampening: float = 0.01, act_order: bool = True,
                   scale: float = 1.0) -> HessianFactor:
    """The factor of the Hessian ``scale · hessian`` (pass an accumulator's ``sum_outer`` with scale 2 to avoid
    a copy of H); ``hessian`` is not modified."""
    diagonal = np.diag(hessian).astype(np.float64) * scale
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal += dampening * np.mean(diagonal)
    order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(len(diagonal))
    reverse = order[::-1]
    permuted = np.asarray(hessian, np.float64)[np.ix_(reverse, reverse)]
    if scale != 1.0:
        permuted *= scale
    permuted[np.diag_indices(len(diagonal))] = diagonal[reverse]
    lower = _cholesky_dampened(permuted)
    del permuted
    inverse = np.linalg.inv(lower)
    del lower
    upper = np.ascontiguousarray(inverse[::-1, ::-1])
    return HessianFactor(order, dead, upper)


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray | None, spec: BlockSpec, *, dampening: float = 0.01,
                  act_order: bool = True, lazy_batch: int = 128, mse_clip: bool = False,
                  factor: HessianFactor | None = None) -> BlockQuantizedWeight:
    """GPTQ of ``weight [K, N]`` with the layer's Hessian ``[K, K]``, or its ``factor`` computed beforehand with
    the same dampening and act-order (see the module docstring)."""
    if factor is None:
        if hessian is None:
            raise ValueError("GPTQ needs the layer's Hessian or its factor")
        factor = factor_hessian(hessian, dampening=dampening, act_order=act_order)
    weight = np.array(weight, np.float64)
    rows, columns = weight.shape
    block = spec.block_size
    weight[factor.dead] = 0.0

    count = -(-rows // block)
    scales = np.zeros((count, columns), np.float32)
    zero_points = None if spec.symmetric else np.zeros((count, columns), np.int32)
    order = factor.order
    if act_order:
        static_scales, static_zero = block_parameters(block_view(weight.astype(np.float32), block), spec,
                                                      mse_clip=mse_clip)
        scales[:] = static_scales
        if zero_points is not None:
            zero_points[:] = static_zero
    weight = weight[order]
    upper = factor.upper
    block_of = order // block  # the stored block of each (permuted) row

    step = max(block, -(-lazy_batch // block) * block)
    quantized = np.zeros_like(weight)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        chunk = weight[start:stop].copy()
        errors = np.zeros_like(chunk)
        for offset in range(stop - start):
            row = start + offset
            stored_block = block_of[row]
            if not act_order and row % block == 0:
                block_rows = chunk[offset:offset + block].astype(np.float32)
                scale, zero = block_parameters(block_rows[None], spec, mse_clip=mse_clip)
                scales[stored_block] = scale[0]
                if zero_points is not None:
                    zero_points[stored_block] = zero[0]
            scale = scales[stored_block]
            zero = zero_points[stored_block] if zero_points is not None else None
            codes = round_codes(chunk[offset], scale, zero, spec).astype(np.float64)
            rounded = (codes - (zero if zero is not None else 0)) * scale
            quantized[row] = rounded
            error = (chunk[offset] - rounded) / upper[row, row]
            chunk[offset:] -= np.outer(upper[row, row:stop], error)
            errors[offset] = error
        weight[stop:] -= upper[start:stop, stop:].T @ errors
    del weight
    restored = np.empty_like(quantized)
    restored[order] = quantized
    del quantized
    return quantize(restored.astype(np.float32), scales, zero_points, spec)


def _cholesky_dampened(hessian: np.ndarray) -> np.ndarray:
    """L lower triangular with ``H = L Lᵀ``, dampening further (in place) if H is not positive definite."""
    for attempt in range(6):
        try:
            return np.linalg.cholesky(hessian)
        except np.linalg.LinAlgError:
            extra = 0.1 * (10 ** attempt) * np.mean(np.diag(hessian))
            logger.info("GPTQ: the Hessian is not positive definite; adding %.3g to its diagonal", extra)
            hessian[np.diag_indices(hessian.shape[0])] += extra
    raise np.linalg.LinAlgError("the GPTQ Hessian stays singular after dampening")

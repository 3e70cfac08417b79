"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling before rounding.

A layer ``y = x·W`` is unchanged by ``y = (x ⊘ s)·(diag(s)·W)`` for any positive per-input-channel s ``[K]``.
Scaling up the rows of W that meet large activations gives those rows a smaller *relative* rounding error, at the
price of the others. The scales are searched on the activation magnitudes ``x̄_k = mean |x_k|``:

    s(α) = x̄^α / sqrt(max(x̄^α) · min(x̄^α)),   α ∈ {0, 1/G, …, 1}
    α*   = argmin_α  Σ_n (w_n − ŵ_n(α))ᵀ H (w_n − ŵ_n(α)),   ŵ(α) = diag(s)⁻¹ · Q(diag(s) · W)

with ``H = 2XᵀX`` the layer's streamed Hessian (:mod:`.gptq`), so the objective is exactly the output error
``‖X(W − ŵ)‖²`` on every calibration token without keeping any token (α = 0 is plain RTN: AWQ never does worse on
that objective). Q is block RTN (:mod:`.rtn`). Layers that read one tensor (q, k and v; gate and up) share one s,
searched on their weights side by side.

The division ``x ⊘ s`` is folded into the producer of x where one exists that only these layers read (the gain of
an RMSNorm, the scale and bias of a LayerNormalization, the columns of the MatMul before a gating Mul), or written
as an explicit ``Mul`` by ``1/s`` (pass ``ApplyInputChannelScales``). The scaled weights ``diag(s)·W`` are then
rounded by RTN or GPTQ; GPTQ uses the Hessian of the scaled input, ``H' = diag(s)⁻¹ H diag(s)⁻¹``.

**Clipping after scaling** (``awq_clip``, with RTN): each block's range is then shrunk by the ratio that
minimizes that block's share of the *output* error (not the weight error), the block-diagonal part of the
objective above:

    r*_{b,n} = argmin over r ∈ {1, 1 − 1/(2G), …, 1/2}  δ_{b,n}(r)ᵀ H_bb δ_{b,n}(r)

with ``δ_{b,n}(r)`` the rounding error of block b of column n under the range ``r·[min, max]`` and ``H_bb`` the
block's B×B diagonal block of H (the cross terms between blocks are left out, as in the paper's search on the
block's own inputs). r = 1 is a candidate, and the clipped weight is kept only where the full objective
``tr(ΔᵀHΔ)`` of the layer is not above the unclipped one's, so clipping never makes a layer worse on it.
"""

from __future__ import annotations

import logging

import numpy as np

from qgraph.quant.blockwise import (
    BlockQuantizedWeight,
    BlockSpec,
    block_view,
    fake_quantize,
    n_blocks,
    parameters_from_range,
    quantize,
)
from qgraph.weight_only.rtn import clip_ratios, quantize_rtn

logger = logging.getLogger(__name__)


def output_error(weight: np.ndarray, approximation: np.ndarray, hessian: np.ndarray) -> float:
    """``Σ_n (w_n − ŵ_n)ᵀ H (w_n − ŵ_n)`` = ``tr(ΔᵀHΔ)``."""
    delta = (np.asarray(weight, np.float64) - approximation).astype(np.float64)
    return float(np.einsum("kn,kn->", delta, hessian @ delta))


def search_scales(weight: np.ndarray, mean_absolute: np.ndarray, hessian: np.ndarray, spec: BlockSpec, *,
                  grid: int = 20, mse_clip: bool = False) -> tuple[np.ndarray, float, float]:
    """The scales s ``[K]`` for ``weight [K, N]`` (the readers of one input side by side), the chosen α and the
    ratio of its output error to RTN's (α = 0)."""
    weight = np.asarray(weight, np.float32)
    magnitude = np.maximum(np.asarray(mean_absolute, np.float64), 1e-8)
    best = (np.ones(weight.shape[0]), 0.0, np.inf)
    baseline = None
    for alpha in np.linspace(0.0, 1.0, grid + 1):
        scales = magnitude ** alpha
        scales = scales / np.sqrt(scales.max() * scales.min())
        scaled = (weight * scales[:, None]).astype(np.float32)
        approximation = quantize_rtn(scaled, spec, mse_clip=mse_clip).dequantize() / scales[:, None]
        error = output_error(weight, approximation, hessian)
        if baseline is None:
            baseline = error
        if error < best[2]:
            best = (scales, float(alpha), error)
    scales, alpha, error = best
    ratio = error / baseline if baseline else 1.0
    logger.debug("AWQ: alpha %.2f, output error %.3g of RTN's", alpha, ratio)
    return scales.astype(np.float32), alpha, ratio


def scaled_hessian(hessian: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``diag(s)⁻¹ H diag(s)⁻¹``: the Hessian of the input ``x ⊘ s``."""
    inverse = 1.0 / np.asarray(scales, np.float64)
    return hessian * inverse[:, None] * inverse[None, :]


def clip_search(weight: np.ndarray, hessian: np.ndarray, spec: BlockSpec) -> BlockQuantizedWeight:
    """RTN of ``weight [K, N]`` with each block's clipping ratio chosen on the output error (module docstring);
    ``hessian`` ``[K, K]`` (any positive multiple of ``XᵀX``)."""
    weight = np.asarray(weight, np.float32)
    rows = weight.shape[0]
    block = spec.block_size
    blocks = block_view(weight, block)
    count = n_blocks(rows, block)
    diagonal_blocks = np.zeros((count, block, block), np.float64)
    for index in range(count):
        start, stop = index * block, min((index + 1) * block, rows)
        diagonal_blocks[index, :stop - start, :stop - start] = hessian[start:stop, start:stop]
    low, high = blocks.min(axis=-2), blocks.max(axis=-2)
    best_scale, best_zero = parameters_from_range(low, high, spec)
    best_error = np.full(best_scale.shape, np.inf)
    for ratio in clip_ratios():
        scale, zero = parameters_from_range(low * ratio, high * ratio, spec)
        expanded_zero = zero[:, None, :] if zero is not None else None
        delta = (blocks - fake_quantize(blocks, scale[:, None, :], expanded_zero, spec)).astype(np.float64)
        error = np.einsum("cbn,cbn->cn", delta, diagonal_blocks @ delta)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
        if zero is not None:
            best_zero = np.where(better, zero, best_zero)
    clipped = quantize(weight, best_scale.astype(np.float32), best_zero, spec)
    plain = quantize_rtn(weight, spec)
    if output_error(weight, clipped.dequantize(), hessian) <= output_error(weight, plain.dequantize(), hessian):
        return clipped
    return plain

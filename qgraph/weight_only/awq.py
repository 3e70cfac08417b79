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
"""

from __future__ import annotations

import logging

import numpy as np

from qgraph.quant.blockwise import BlockSpec
from qgraph.weight_only.rtn import quantize_rtn

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

"""RTN: round to nearest, block by block, optionally with a searched clipping ratio.

Plain RTN takes each block's range ``[min, max]`` (0 included) and rounds every weight to its nearest code
(:mod:`qgraph.quant.blockwise`). With ``mse_clip`` the range of each block (of each column) is shrunk by the ratio

    r* = argmin over r ∈ {1, 1 − 1/(2G), …, 1/2}  Σ_{k ∈ block} (w_k − ŵ_k(r))²,   ŵ(r) = Q_{[r·min, r·max]}(w)

(G = :data:`CLIP_GRID` ratios): a smaller range gives a finer step to the many small weights at the price of
clipping the few large ones, and r = 1 is among the candidates, so the searched error is never above plain RTN's.
"""

from __future__ import annotations

import numpy as np

from qgraph.quant.blockwise import (
    BlockQuantizedWeight,
    BlockSpec,
    block_view,
    fake_quantize,
    parameters_from_range,
    quantize,
)

#: Clipping ratios searched per block (1 down to 0.5).
CLIP_GRID = 20


def clip_ratios() -> np.ndarray:
    return np.linspace(1.0, 0.5, CLIP_GRID + 1)


def block_parameters(blocks: np.ndarray, spec: BlockSpec, *, mse_clip: bool = False,
                     importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales and zero points for ``blocks [..., B, N]`` (reduced over the B axis, -2).

    ``importance [..., B, 1]`` weighs each row's squared error in the clipping search (AWQ passes the activation
    energy; None weighs all rows alike).
    """
    low, high = blocks.min(axis=-2), blocks.max(axis=-2)
    best_scale, best_zero = parameters_from_range(low, high, spec)
    if not mse_clip:
        return best_scale, best_zero
    weight = importance if importance is not None else 1.0
    best_error = np.full(best_scale.shape, np.inf)
    for ratio in clip_ratios():
        scale, zero = parameters_from_range(low * ratio, high * ratio, spec)
        expanded_zero = zero[..., None, :] if zero is not None else None
        error = (weight * (blocks - fake_quantize(blocks, scale[..., None, :], expanded_zero, spec)) ** 2).sum(-2)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
        if zero is not None:
            best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero


def quantize_rtn(weight: np.ndarray, spec: BlockSpec, *, mse_clip: bool = False) -> BlockQuantizedWeight:
    """RTN of ``weight [K, N]`` in blocks along K."""
    weight = np.asarray(weight, np.float32)
    scales, zero_points = block_parameters(block_view(weight, spec.block_size), spec, mse_clip=mse_clip)
    return quantize(weight, scales, zero_points, spec)

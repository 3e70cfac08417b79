"""Float64 numpy pieces of the reference transformers that the text encoder and text decoder tests check their
graphs against, and the weights they run on (each model's initialisation with noise on every tensor, so LayerNorm
affine terms and biases matter too)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

#: The sizes of the two-layer models the graph tests build (each test adds its ``max_positions``).
SMALL_SIZES = {"vocab_size": 40, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}


def perturbed(weights: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """``weights`` plus ``N(0, 0.3²)`` noise on every element."""
    generator = np.random.default_rng(seed)
    return {name: (value + 0.3 * generator.standard_normal(value.shape)).astype(np.float32)
            for name, value in weights.items()}


def as_float64(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: value.astype(np.float64) for name, value in weights.items()}


def layer_norm(x, weight, bias, epsilon):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * weight + bias


def gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def dense(w: Mapping[str, np.ndarray], h, prefix: str):
    """``h · W + b`` of the dense layer ``prefix`` (``W`` stored ``(in, out)``)."""
    return h @ w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def self_attention(w: Mapping[str, np.ndarray], h, projections: Sequence[str], mask, heads: int):
    """``Softmax(q·kᵀ/√d + mask) · v`` per head with the query, key and value projections named in
    ``projections``, heads merged back to ``batch × length × hidden``."""
    batch, length, hidden = h.shape
    head_dim = hidden // heads

    def split(values):
        return values.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = (split(dense(w, h, prefix)) for prefix in projections)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + mask
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    context = (scores / scores.sum(-1, keepdims=True)) @ v
    return context.transpose(0, 2, 1, 3).reshape(batch, length, hidden)

"""QDQ models with 4-bit weights stored as int8 codes (``--weight-bits 4`` before StoreInt4Weights), for the tests of
StoreInt4Weights, LowerFourBitMatMul and the protocol corpus."""

from __future__ import annotations

import numpy as np

from tests.passes.qdq_builders import QDQBuilder


def four_bit_matmul(*, rows: int = 40, columns: int = 6, opset: int = 21, quantized_output: bool = True,
                    per_channel: bool = True, seed: int = 11):
    """``Q/DQ(x) → MatMul(·, DQ(q ∈ [-7, 7]; axis 1)) [→ Q/DQ]``; returns (builder, output name)."""
    builder = QDQBuilder(seed=seed)
    builder.opset = opset
    rng = np.random.default_rng(seed)
    x = builder.quantize(builder.add_input("x", [3, rows]))
    weight, _ = builder.weight(rng.standard_normal((rows, columns)).astype(np.float32), axis=1 if per_channel else None,
                               bits=4)
    y = builder.node("MatMul", [x, weight])
    return builder, builder.output(builder.quantize(y) if quantized_output else y)


def four_bit_gemm(*, rows: int = 24, columns: int = 5, trans_b: int = 1, seed: int = 12, **attributes):
    """``Q/DQ(x) → Gemm(·, DQ(q ∈ [-7, 7]), DQ(int32 bias); transB) → Q/DQ``; returns (builder, output name)."""
    builder = QDQBuilder(seed=seed)
    rng = np.random.default_rng(seed)
    x = builder.quantize(builder.add_input("x", [2, rows]))
    shape = (columns, rows) if trans_b else (rows, columns)
    weight, scale = builder.weight(rng.standard_normal(shape).astype(np.float32), axis=0 if trans_b else 1, bits=4)
    bias = builder.bias(rng.standard_normal(columns).astype(np.float32), builder.scales[x][0], scale)
    y = builder.node("Gemm", [x, weight, bias], transB=trans_b, **attributes)
    return builder, builder.output(builder.quantize(y))


def four_bit_conv(*, opset: int = 17, seed: int = 13):
    """``Q/DQ(x) → Conv(·, DQ(q ∈ [-7, 7]; axis 0), DQ(int32 bias)) → Relu → Q/DQ``."""
    builder = QDQBuilder(seed=seed)
    builder.opset = opset
    rng = np.random.default_rng(seed)
    x = builder.quantize(builder.add_input("x", [1, 3, 8, 8]))
    y = builder.conv(x, rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32),
                     bits=4, pads=[1, 1, 1, 1])
    return builder, builder.output(builder.quantize(builder.node("Relu", [y])))

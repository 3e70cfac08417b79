"""A small QDQ CNN lowered end to end for onnxruntime's CPU integer kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph.passes.infrastructure import PassManager
from qgraph.passes.lower.lower_conv_integer import LowerConvInteger
from qgraph.passes.lower.lower_integer_matmul import LowerIntegerMatMul
from qgraph.passes.lower.lower_integer_passthrough import LowerIntegerPassThrough
from qgraph.passes.lower.lower_qgemm import LowerQGemm
from qgraph.passes.lower.lower_qlinear_binary import LowerQLinearBinary
from qgraph.passes.lower.lower_qlinear_concat import LowerQLinearConcat
from qgraph.passes.lower.lower_qlinear_conv import LowerQLinearConv
from qgraph.passes.lower.lower_qlinear_matmul import LowerQLinearMatMul
from qgraph.passes.lower.lower_qlinear_pool import LowerQLinearPool
from qgraph.passes.lower.lower_qlinear_unary import LowerQLinearUnary
from qgraph.passes.lower.remove_redundant_quantization import RemoveRedundantQuantization
from tests.passes.qdq_builders import QDQBuilder, count_ops, run_both

LOWERING = (
    LowerQLinearConv, LowerConvInteger, LowerQLinearMatMul, LowerIntegerMatMul, LowerQGemm, LowerQLinearBinary,
    LowerQLinearConcat, LowerQLinearPool, LowerQLinearUnary, LowerIntegerPassThrough,
)


def small_cnn(*, channels: int = 8, size: int = 12, classes: int = 10, seed: int = 0):
    """Conv-Relu-MaxPool-Conv-Relu-Add(residual)-GlobalAveragePool-Flatten-Gemm in the QDQ form."""
    builder = QDQBuilder(seed=seed)
    rng = np.random.default_rng(seed)

    def weights(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    x = builder.quantize(builder.add_input("image", [1, 3, size, size]))
    y = builder.conv(x, weights(channels, 3, 3, 3), weights(channels, 1).reshape(-1), pads=[1, 1, 1, 1])
    y = builder.quantize(builder.node("Relu", [y]))
    scale, zero_point = builder.scales[y]
    pooled = builder.quantize(builder.node("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2]),
                              scale=scale, zero_point=zero_point)
    y = builder.conv(pooled, weights(channels, channels, 3, 3), weights(channels, 1).reshape(-1), pads=[1, 1, 1, 1])
    y = builder.quantize(builder.node("Relu", [y]))
    y = builder.quantize(builder.node("Add", [y, pooled]))
    y = builder.quantize(builder.node("GlobalAveragePool", [y]))
    scale, zero_point = builder.scales[y]
    y = builder.quantize(builder.node("Flatten", [y], axis=1), scale=scale, zero_point=zero_point)
    weight_value, weight_scale = builder.weight(weights(classes, channels), axis=0)
    bias = builder.bias(weights(classes, 1).reshape(-1), builder.scales[y][0], weight_scale)
    logits = builder.output(builder.node("Gemm", [y, weight_value, bias], transB=1))
    low, high = builder.observe(logits)
    return builder, logits, (high - low) / 255


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_small_cnn_lowers_fully(order):
    builder, logits, logits_step = small_cnn()
    model = builder.model()
    onnx.checker.check_model(model, full_check=True)
    passes = [cls() for cls in LOWERING]
    if order == "reversed":
        passes.reverse()
    result = PassManager([*passes, RemoveRedundantQuantization()], fixed_point=True).run(
        ir.serde.deserialize_model(model)
    )
    lowered = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(lowered, full_check=True)
    counts = count_ops(lowered)
    assert counts == {
        "QuantizeLinear": 1, "QLinearConv": 2, "Transpose": 2, "NhwcMaxPool": 1, "QLinearAdd": 1,
        "QLinearGlobalAveragePool": 1, "Flatten": 1, "QGemm": 1,
    }, counts
    assert [output.name for output in lowered.graph.output] == [logits]
    differences = []
    for seed in range(4):
        before, after = run_both(model, lowered, seed=seed)
        differences.append(float(np.abs(before[logits] - after[logits]).max()))
    assert max(differences) <= 2 * logits_step, (differences, logits_step)

"""LowerQLinearMatMul, LowerIntegerMatMul and LowerQGemm on hand-built QDQ islands."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.passes.lower.lower_integer_matmul import LowerIntegerMatMul
from qgraph.passes.lower.lower_qgemm import LowerQGemm
from qgraph.passes.lower.lower_qlinear_matmul import LowerQLinearMatMul
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


def matmul_model(*, quantized_output: bool, per_channel: bool = True, weight_axis: int = 1, bits: int = 8,
                 activation: str | None = None, three_d: bool = False):
    builder = QDQBuilder(seed=3)
    rng = np.random.default_rng(3)
    a = builder.quantize(builder.add_input("a", [2, 5, 8] if three_d else [5, 8]))
    weight_value, _ = builder.weight(rng.standard_normal((8, 6)).astype(np.float32),
                                     axis=weight_axis if per_channel else None, bits=bits)
    y = builder.node("MatMul", [a, weight_value])
    if activation:
        y = builder.node(activation, [y])
    out = builder.output(builder.quantize(y) if quantized_output else y)
    return builder, out


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [8, 7])
def test_quantized_matmul_lowers_to_qlinearmatmul(per_channel, bits):
    builder, out = matmul_model(quantized_output=True, per_channel=per_channel, bits=bits)
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, "QLinearMatMul": 1, "DequantizeLinear": 1}


def test_batched_left_operand_and_fused_relu():
    builder, out = matmul_model(quantized_output=True, activation="Relu", three_d=True)
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    assert "Relu" not in count_ops(lowered) and count_ops(lowered)["QLinearMatMul"] == 1


def test_per_channel_on_reduction_axis_is_refused():
    builder, _ = matmul_model(quantized_output=True, weight_axis=0)
    lower_and_check(builder.model(), LowerQLinearMatMul(), expect_modified=False)
    lower_and_check(builder.model(), LowerIntegerMatMul(), expect_modified=False)


def test_activation_times_activation():
    builder = QDQBuilder(seed=4)
    a = builder.quantize(builder.add_input("a", [4, 6]))
    b = builder.quantize(builder.add_input("b", [6, 3]))
    out = builder.output(builder.quantize(builder.node("MatMul", [a, b])))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered)["QLinearMatMul"] == 1


def test_float_output_lowers_to_matmulinteger_and_rescale():
    builder, out = matmul_model(quantized_output=False)
    model = builder.model()
    lower_and_check(model, LowerQLinearMatMul(), expect_modified=False)
    _, lowered, _, _ = lower_and_check(model, LowerIntegerMatMul())
    assert count_ops(lowered) == {"QuantizeLinear": 1, "MatMulInteger": 1, "Cast": 1, "Mul": 1}


def test_integer_matmul_leaves_quantized_output_alone():
    builder, _ = matmul_model(quantized_output=True)
    lower_and_check(builder.model(), LowerIntegerMatMul(), expect_modified=False)


def test_weight_dequantize_shared_with_float_reader_is_kept():
    builder = QDQBuilder(seed=5)
    a = builder.quantize(builder.add_input("a", [3, 4]))
    weight_value, _ = builder.weight(np.random.default_rng(5).standard_normal((4, 4)).astype(np.float32), axis=1)
    out = builder.output(builder.quantize(builder.node("MatMul", [a, weight_value])))
    builder.output(builder.node("Relu", [weight_value]))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearMatMul(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered)["DequantizeLinear"] == 2 and count_ops(lowered)["Relu"] == 1


def gemm_model(*, quantized_output: bool, transpose_b: int = 1, alpha: float = 1.0, beta: float = 1.0,
               per_channel: bool = True, float_bias: bool = False, relu: bool = False):
    builder = QDQBuilder(seed=6)
    rng = np.random.default_rng(6)
    a = builder.quantize(builder.add_input("a", [3, 10]))
    weight = rng.standard_normal((7, 10) if transpose_b else (10, 7)).astype(np.float32)
    weight_value, weight_scale = builder.weight(weight, axis=(0 if transpose_b else 1) if per_channel else None)
    bias = rng.standard_normal(7).astype(np.float32)
    bias_value = builder.constant("c", bias) if float_bias else builder.bias(bias, builder.scales[a][0], weight_scale)
    y = builder.node("Gemm", [a, weight_value, bias_value], transB=transpose_b, alpha=alpha, beta=beta)
    if relu:
        y = builder.node("Relu", [y])
    out = builder.output(builder.quantize(y) if quantized_output else y)
    return builder, out


@pytest.mark.parametrize("transpose_b", [0, 1])
@pytest.mark.parametrize("per_channel", [True, False])
def test_gemm_with_quantized_output_lowers_to_qgemm(transpose_b, per_channel):
    builder, out = gemm_model(quantized_output=True, transpose_b=transpose_b, per_channel=per_channel, relu=True)
    model, lowered, _, _ = lower_and_check(builder.model(), LowerQGemm(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, "QGemm": 1, "DequantizeLinear": 1}
    qgemm = next(node for node in model.graph if node.op_type == "QGemm")
    assert qgemm.domain == "com.microsoft" and qgemm.outputs[0].dtype == ir.DataType.UINT8
    assert qgemm.inputs[6].name.startswith("bq")  # the contract's int32 bias is used unchanged


@pytest.mark.parametrize("alpha, beta, float_bias", [(1.0, 1.0, False), (0.5, 2.0, False), (1.0, 1.0, True)])
def test_gemm_with_float_output_lowers_to_float_qgemm(alpha, beta, float_bias):
    builder, _ = gemm_model(quantized_output=False, alpha=alpha, beta=beta, float_bias=float_bias)
    # a bias outside the accumulator scale (float, or alpha/beta != 1) is requantized: half an accumulator step
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQGemm(), float_atol=1e-4)
    assert count_ops(lowered) == {"QuantizeLinear": 1, "QGemm": 1}


def test_gemm_with_non_constant_bias_is_refused():
    builder = QDQBuilder(seed=7)
    a = builder.quantize(builder.add_input("a", [2, 4]))
    weight_value, _ = builder.weight(np.ones((3, 4), np.float32), axis=0)
    bias = builder.add_input("bias", [3])
    builder.output(builder.node("Gemm", [a, weight_value, bias], transB=1))
    lower_and_check(builder.model(), LowerQGemm(), expect_modified=False)

"""LowerQGemm on hand-built QDQ Gemm islands (quantized and float outputs)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.passes.lower.lower_qgemm import LowerQGemm
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


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


def qgemm_of(model: ir.Model) -> ir.Node:
    return next(node for node in model.graph if node.op_type == "QGemm")


def test_wide_weights_are_widened_to_uint8_and_seven_bit_weights_are_not():
    builder, out = gemm_model(quantized_output=True)
    model, _, _, _ = lower_and_check(builder.model(), LowerQGemm(), output_scales={out: builder.scales[out]})
    qgemm = qgemm_of(model)
    assert qgemm.inputs[3].dtype == ir.DataType.UINT8 and qgemm.inputs[5].dtype == ir.DataType.UINT8
    np.testing.assert_array_equal(qgemm.inputs[5].const_value.numpy(), np.full(7, 128, np.uint8))

    builder = QDQBuilder(seed=6)
    a = builder.quantize(builder.add_input("a", [3, 10]))
    weight_value, _ = builder.weight(np.random.default_rng(6).standard_normal((7, 10)).astype(np.float32), axis=0,
                                     bits=7)
    out = builder.output(builder.quantize(builder.node("Gemm", [a, weight_value], transB=1)))
    model, lowered, _, _ = lower_and_check(builder.model(), LowerQGemm(), output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 1, "QGemm": 1, "DequantizeLinear": 1}
    qgemm = qgemm_of(model)
    assert qgemm.inputs[3].dtype == ir.DataType.INT8 and qgemm.inputs[6] is None  # no C input


def test_bias_of_shape_m_by_n_is_requantized():
    builder = QDQBuilder(seed=7)
    rng = np.random.default_rng(7)
    a = builder.quantize(builder.add_input("a", [3, 10]))
    weight_value, _ = builder.weight(rng.standard_normal((10, 7)).astype(np.float32), axis=1)
    bias = builder.constant("c", rng.standard_normal((3, 7)).astype(np.float32))
    builder.output(builder.node("Gemm", [a, weight_value, bias]))
    model, lowered, _, _ = lower_and_check(builder.model(), LowerQGemm(), float_atol=1e-4)
    assert count_ops(lowered) == {"QuantizeLinear": 1, "QGemm": 1}
    assert qgemm_of(model).inputs[6].const_value.numpy().shape == (3, 7)


def test_per_channel_weight_on_the_reduction_axis_is_refused(caplog):
    builder = QDQBuilder(seed=6)
    a = builder.quantize(builder.add_input("a", [3, 10]))
    weight_value, _ = builder.weight(np.random.default_rng(6).standard_normal((7, 10)).astype(np.float32), axis=1)
    builder.output(builder.quantize(builder.node("Gemm", [a, weight_value], transB=1)))
    assert_refused(builder.model(), LowerQGemm(), caplog, "not its output axis 0")


def test_int8_output_is_refused(caplog):
    builder = QDQBuilder(seed=6)
    a = builder.quantize(builder.add_input("a", [3, 10]))
    weight_value, _ = builder.weight(np.random.default_rng(6).standard_normal((7, 10)).astype(np.float32), axis=0)
    builder.output(builder.quantize(builder.node("Gemm", [a, weight_value], transB=1), dtype=np.int8))
    assert_refused(builder.model(), LowerQGemm(), caplog, "the kernel writes")


def test_relu_the_output_range_does_not_imply_is_refused(caplog):
    builder = QDQBuilder(seed=6)
    a = builder.quantize(builder.add_input("a", [3, 10]))
    weight_value, _ = builder.weight(np.random.default_rng(6).standard_normal((7, 10)).astype(np.float32), axis=0)
    relu = builder.node("Relu", [builder.node("Gemm", [a, weight_value], transB=1)])
    builder.output(builder.quantize(relu, scale=0.05, zero_point=30))
    assert_refused(builder.model(), LowerQGemm(), caplog, "not implied by the output range")

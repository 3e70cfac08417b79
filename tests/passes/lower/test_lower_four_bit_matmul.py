"""LowerFourBitMatMul: MatMul/Gemm over a per-channel 4-bit DQ weight becomes packed MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.passes.lower.lower_four_bit_matmul import LowerFourBitMatMul, block_size_for
from qgraph.quant.blockwise import dequantize_matmul_nbits
from tests.passes.lower.four_bit_models import four_bit_gemm, four_bit_matmul
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


def _weight_codes_and_scale(builder: QDQBuilder) -> tuple[np.ndarray, np.ndarray]:
    model = ir.serde.deserialize_model(builder.model())
    dequantize = next(node for node in model.graph if node.op_type == "DequantizeLinear"
                      and node.inputs[0].is_initializer() and node.inputs[0].dtype == ir.DataType.INT8)
    return dequantize.inputs[0].const_value.numpy(), dequantize.inputs[1].const_value.numpy()


@pytest.mark.parametrize(("rows", "block"), [(40, 64), (200, 128), (256, 128)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_lowers_to_packed_nbits_within_one_step(rows, block, per_channel):
    builder, out = four_bit_matmul(rows=rows, per_channel=per_channel)
    model, lowered, _, _ = lower_and_check(builder.model(), LowerFourBitMatMul(),
                                           output_scales={out: builder.scales[out]})
    assert count_ops(lowered) == {"QuantizeLinear": 2, "DequantizeLinear": 2, "MatMulNBits": 1}
    nbits = next(node for node in model.graph if node.op_type == "MatMulNBits")
    assert nbits.attributes["block_size"].value == block == block_size_for(rows)
    # The packed weight reads back, element by element, as the DequantizeLinear's s · q (K padded with zeros).
    codes, scale = _weight_codes_and_scale(builder)
    packed, scales = (value.const_value.numpy() for value in nbits.inputs[1:3])
    weight = dequantize_matmul_nbits(packed, scales, None, rows, block)
    np.testing.assert_array_equal(weight, (codes * scale).astype(np.float32))


def test_float_output_matches_the_dequantized_matmul():
    builder, _ = four_bit_matmul(quantized_output=False)
    _, lowered, _, _ = lower_and_check(builder.model(), LowerFourBitMatMul(), float_atol=1e-5)
    assert count_ops(lowered)["MatMulNBits"] == 1


@pytest.mark.parametrize("trans_b", [1, 0])
def test_gemm_with_int32_bias_becomes_nbits_and_add(trans_b):
    builder, out = four_bit_gemm(trans_b=trans_b)
    _, lowered, _, _ = lower_and_check(builder.model(), LowerFourBitMatMul(), output_scales={out: builder.scales[out]})
    counts = count_ops(lowered)
    assert counts["MatMulNBits"] == 1 and counts["Add"] == 1 and "Gemm" not in counts
    assert counts["DequantizeLinear"] == 3  # input, the int32 bias, output


def test_eight_bit_weight_is_refused(caplog):
    builder = QDQBuilder(seed=6)
    x = builder.quantize(builder.add_input("x", [2, 8]))
    weight, _ = builder.weight(np.random.default_rng(6).standard_normal((8, 3)).astype(np.float32), axis=1)
    builder.output(builder.quantize(builder.node("MatMul", [x, weight])))
    assert_refused(builder.model(), LowerFourBitMatMul(), caplog, "beyond 4 bits (an 8-bit weight)")


def test_gemm_with_alpha_is_refused(caplog):
    builder, _ = four_bit_gemm(alpha=0.5)
    assert_refused(builder.model(), LowerFourBitMatMul(), caplog, "a Gemm with transA, alpha or beta")


def test_weight_quantized_along_its_input_axis_is_refused(caplog):
    builder = QDQBuilder(seed=7)
    x = builder.quantize(builder.add_input("x", [2, 8]))
    weight, _ = builder.weight(np.random.default_rng(7).standard_normal((8, 8)).astype(np.float32), axis=0, bits=4)
    builder.output(builder.quantize(builder.node("MatMul", [x, weight])))
    assert_refused(builder.model(), LowerFourBitMatMul(), caplog, "is quantized along axis 0, not per output channel")


def test_non_zero_weight_zero_point_is_refused(caplog):
    builder = QDQBuilder(seed=8)
    x = builder.quantize(builder.add_input("x", [2, 4]))
    codes = builder.constant("codes", np.random.default_rng(8).integers(-7, 8, (4, 3)).astype(np.int8))
    weight = builder.node("DequantizeLinear", [codes, builder.constant("scale", np.float32(0.1)),
                                               builder.constant("zero", np.int8(1))])
    builder.output(builder.quantize(builder.node("MatMul", [x, weight])))
    assert_refused(builder.model(), LowerFourBitMatMul(), caplog, "non-zero zero point")


def test_block_size_for_small_and_large_inputs():
    assert [block_size_for(rows) for rows in (3, 16, 17, 100, 128, 129, 4096)] == [16, 16, 32, 128, 128, 128, 128]
    assert block_size_for(4096, 256) == 256


@pytest.mark.parametrize("rows", [64, 768])
def test_accuracy_level_4_stays_within_one_step(rows):
    """onnxruntime requantizes x to int8 per block: on Gaussian inputs each output moves by at most one step."""
    builder, out = four_bit_matmul(rows=rows, columns=32)
    model, _, _, _ = lower_and_check(builder.model(), LowerFourBitMatMul(accuracy_level=4),
                                     output_scales={out: builder.scales[out]})
    nbits = next(node for node in model.graph if node.op_type == "MatMulNBits")
    assert nbits.attributes["accuracy_level"].value == 4


def test_unknown_accuracy_level_is_refused():
    with pytest.raises(ValueError, match="accuracy_level must be one of"):
        LowerFourBitMatMul(accuracy_level=2)

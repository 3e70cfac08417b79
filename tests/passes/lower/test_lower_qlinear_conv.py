"""LowerQLinearConv on hand-built QDQ Conv islands."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.passes.lower.lower_qlinear_conv import LowerQLinearConv
from tests.passes.lower.islands import assert_refused, conv_island, dequantize_constant, dequantize_input
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check, quantize_weight


def test_conv_relu_lowers_to_one_qlinearconv():
    builder, out = conv_island()
    model, lowered, _, _ = lower_and_check(
        builder.model(), LowerQLinearConv(), output_scales={out: builder.scales[out]}
    )
    counts = count_ops(lowered)
    assert counts == {"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1}
    # 8-bit weights exceed |w| <= 64: stored as uint8 so the AVX2 u8·s8 kernel cannot saturate
    conv = next(node for node in model.graph if node.op_type == "QLinearConv")
    assert conv.inputs[3].dtype == ir.DataType.UINT8 and conv.inputs[8].dtype == ir.DataType.INT32


def test_seven_bit_weights_stay_int8_and_per_tensor_weights_lower():
    builder, out = conv_island(bits=7, per_channel=False, bias=False)
    model, _, _, _ = lower_and_check(builder.model(), LowerQLinearConv(), output_scales={out: builder.scales[out]})
    conv = next(node for node in model.graph if node.op_type == "QLinearConv")
    assert conv.inputs[3].dtype == ir.DataType.INT8 and len(conv.inputs) == 8


def test_clip_implied_by_output_range_is_fused():
    builder, out = conv_island(activation="Clip", output_scale=6.0 / 255, output_zero_point=0)
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearConv(), output_scales={out: builder.scales[out]})
    assert "Clip" not in count_ops(lowered)


def test_clip_narrower_than_output_range_is_refused():
    builder, _ = conv_island(activation="Clip", clip=(0.0, 1.0), output_scale=6.0 / 255, output_zero_point=0)
    lower_and_check(builder.model(), LowerQLinearConv(), expect_modified=False)


def test_relu_not_implied_when_zero_point_above_qmin(caplog):
    builder, _ = conv_island(output_zero_point=20, output_scale=0.05)
    with caplog.at_level("INFO"):
        lower_and_check(builder.model(), LowerQLinearConv(), expect_modified=False)
    assert "not implied by the output range" in caplog.text


def test_shared_input_dequantize_is_kept_for_its_float_reader():
    builder = QDQBuilder()
    x = builder.quantize(builder.add_input("x", [1, 3, 6, 6]))
    weight = np.random.default_rng(1).standard_normal((2, 3, 1, 1)).astype(np.float32)
    out = builder.output(builder.quantize(builder.conv(x, weight)))
    builder.output(builder.node("Sigmoid", [x]))
    _, lowered, _, _ = lower_and_check(builder.model(), LowerQLinearConv(), output_scales={out: builder.scales[out]})
    counts = count_ops(lowered)
    assert counts["QLinearConv"] == 1 and counts["Sigmoid"] == 1 and counts["DequantizeLinear"] == 2


def test_non_constant_output_scale_is_refused():
    builder, _ = conv_island()
    model = builder.model()
    quantize = [node for node in model.graph.node if node.op_type == "QuantizeLinear"][-1]
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [quantize.input[1]], ["computed_scale"]))
    quantize.input[1] = "computed_scale"
    lower_and_check(model, LowerQLinearConv(), expect_modified=False)


def test_saturation_guard_keeps_full_range_weights_exact():
    """All-max inputs and weights: u8·s8 saturates on AVX2 without VNNI, the widened u8 weights do not."""
    builder = QDQBuilder()
    x = builder.quantize(builder.add_input("x", [1, 64, 2, 2]), scale=1.0, zero_point=0)
    weight = np.full((2, 64, 1, 1), 1.0, np.float32)
    out = builder.output(builder.quantize(builder.conv(x, weight), scale=64.0, zero_point=0))
    model = builder.model()
    proto = ir.serde.serialize_model(LowerQLinearConv()(ir.serde.deserialize_model(model)).model)
    from qgraph import runtime
    feeds = {"x": np.full((1, 64, 2, 2), 255.0, np.float32)}
    expected = runtime.run(runtime.create_session(model), feeds)[out]
    actual = runtime.run(runtime.create_session(proto), feeds)[out]
    np.testing.assert_allclose(actual, expected, atol=64.0)


def conv_with_weight(weight_value_of, *, seed: int = 0):
    """``DQ(x) → Conv(DQ(W)) → Q(y)``; ``weight_value_of(builder)`` writes the weight's DQ."""
    builder = QDQBuilder(seed=seed)
    x = builder.quantize(builder.add_input("x", [1, 3, 6, 6]))
    out = builder.output(builder.quantize(builder.node("Conv", [x, weight_value_of(builder)], pads=[1, 1, 1, 1])))
    return builder, out


def conv_weight(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 3, 3, 3)).astype(np.float32)


def test_guard_off_keeps_the_contract_int8_weights():
    builder, out = conv_island()
    model = ir.serde.deserialize_model(builder.model())
    result = LowerQLinearConv(guard_saturation=False)(model)
    assert result.modified
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    conv = next(node for node in result.model.graph if node.op_type == "QLinearConv")
    assert conv.inputs[3].dtype == ir.DataType.INT8 and conv.inputs[3].name.startswith("Wq")


def test_weight_zero_points_that_differ_across_channels_are_refused(caplog):
    codes, scale = quantize_weight(conv_weight(), axis=0)
    builder, _ = conv_with_weight(lambda builder: dequantize_constant(
        builder, codes, scale, np.array([0, 0, 2, 0], np.int8), axis=0))
    assert_refused(builder.model(), LowerQLinearConv(), caplog, "zero points differ across channels")


def test_per_channel_weights_on_the_input_channel_axis_are_refused(caplog):
    codes, scale = quantize_weight(conv_weight(), axis=1)
    builder, _ = conv_with_weight(lambda builder: dequantize_constant(builder, codes, scale, np.zeros(3, np.int8),
                                                                      axis=1))
    assert_refused(builder.model(), LowerQLinearConv(), caplog, "QLinearConv needs axis 0")


def test_non_constant_weight_is_refused(caplog):
    builder, _ = conv_with_weight(lambda builder: dequantize_input(builder, "weight_codes", [4, 3, 3, 3]))
    assert_refused(builder.model(), LowerQLinearConv(), caplog, "the weight is not a constant initializer")

"""LowerConvInteger on hand-built QDQ Conv islands whose output stays float."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.passes.lower.lower_conv_integer import LowerConvInteger
from qgraph.passes.lower.lower_qlinear_conv import LowerQLinearConv
from tests.passes.lower.islands import assert_refused, conv_island, dequantize_constant, dequantize_input
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check, quantize_weight


def test_float_graph_output_goes_to_conv_integer():
    builder = QDQBuilder()
    rng = np.random.default_rng(2)
    x = builder.quantize(builder.add_input("x", [1, 3, 6, 6]))
    y = builder.output(builder.conv(x, rng.standard_normal((5, 3, 3, 3)).astype(np.float32),
                                    rng.standard_normal(5).astype(np.float32), strides=[2, 2]))
    model = builder.model()
    lower_and_check(model, LowerQLinearConv(), expect_modified=False)
    _, lowered, _, _ = lower_and_check(model, LowerConvInteger())
    counts = count_ops(lowered)
    assert counts == {"QuantizeLinear": 1, "ConvInteger": 1, "Cast": 1, "Mul": 1, "Add": 1}
    assert y in [output.name for output in lowered.graph.output]


def test_conv_integer_leaves_quantized_output_to_qlinearconv():
    builder, _ = conv_island()
    lower_and_check(builder.model(), LowerConvInteger(), expect_modified=False)


def float_conv(weight_value_of, *, input_dtype=np.uint8, seed: int = 3):
    """``DQ(x) → Conv(DQ(W)) → float y`` (a graph output); ``weight_value_of(builder)`` writes the weight's DQ."""
    builder = QDQBuilder(seed=seed)
    x = builder.quantize(builder.add_input("x", [1, 2, 5, 5]), dtype=input_dtype)
    builder.output(builder.node("Conv", [x, weight_value_of(builder)], pads=[1, 1, 1, 1]))
    return builder, x


def weight(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 2, 3, 3)).astype(np.float32)


def conv_integer_of(model: ir.Model) -> ir.Node:
    return next(node for node in model.graph if node.op_type == "ConvInteger")


def test_per_channel_scales_go_to_the_float_rescale():
    weight_scales = {}

    def per_channel(builder):
        value, weight_scales["w"] = builder.weight(weight(), axis=0)
        return value

    builder, x = float_conv(per_channel)
    model, lowered, _, _ = lower_and_check(builder.model(), LowerConvInteger())
    assert count_ops(lowered) == {"QuantizeLinear": 1, "ConvInteger": 1, "Cast": 1, "Mul": 1}
    conv = conv_integer_of(model)
    assert list(conv.attributes["pads"].as_ints()) == [1, 1, 1, 1]
    multiply = next(node for node in model.graph if node.op_type == "Mul")
    rescale = multiply.inputs[1].const_value.numpy()
    expected = np.float64(builder.scales[x][0]) * weight_scales["w"].astype(np.float64)
    assert rescale.shape == (3, 1, 1)  # one scale per output channel, broadcast over the spatial axes
    np.testing.assert_allclose(rescale.reshape(-1), expected, rtol=1e-7)


def test_per_tensor_int8_weights_are_stored_as_uint8_with_one_zero_point():
    builder, _ = float_conv(lambda builder: builder.weight(weight(), axis=None)[0])
    model, lowered, _, _ = lower_and_check(builder.model(), LowerConvInteger())
    assert count_ops(lowered) == {"QuantizeLinear": 1, "ConvInteger": 1, "Cast": 1, "Mul": 1}
    conv = conv_integer_of(model)
    codes, _ = quantize_weight(weight(), axis=None)
    # onnxruntime's ConvInteger runs uint8 weights only: the same real weights as Wq + 128 with zero point 128
    np.testing.assert_array_equal(conv.inputs[1].const_value.numpy(), (codes.astype(np.int16) + 128).astype(np.uint8))
    zero_point = conv.inputs[3].const_value.numpy()
    assert zero_point.dtype == np.uint8 and zero_point.shape == () and int(zero_point) == 128


def test_weight_zero_points_that_differ_across_channels_are_refused(caplog):
    codes, scale = quantize_weight(weight(), axis=0)
    builder, _ = float_conv(lambda builder: dequantize_constant(
        builder, codes, scale, np.array([0, 1, 0], np.int8), axis=0))
    assert_refused(builder.model(), LowerConvInteger(), caplog, "zero points differ across channels")


def test_per_channel_weights_on_the_input_channel_axis_are_refused(caplog):
    codes, scale = quantize_weight(weight(), axis=1)
    builder, _ = float_conv(lambda builder: dequantize_constant(builder, codes, scale, np.zeros(2, np.int8), axis=1))
    assert_refused(builder.model(), LowerConvInteger(), caplog, "per channel along axis 1, not 0")


def test_non_constant_weight_is_refused(caplog):
    builder, _ = float_conv(lambda builder: dequantize_input(builder, "weight_codes", [3, 2, 3, 3]))
    assert_refused(builder.model(), LowerConvInteger(), caplog, "the weight is not a constant initializer")


def test_int8_activation_is_refused(caplog):
    builder, _ = float_conv(lambda builder: builder.weight(weight(), axis=0)[0], input_dtype=np.int8)
    assert_refused(builder.model(), LowerConvInteger(), caplog, "the kernel takes")

"""RemoveRedundantQuantization on hand-built DQ → Q pairs and unread Q/DQ chains."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qgraph.passes.lower.remove_redundant_quantization import RemoveRedundantQuantization
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check, run_both


def test_dequantize_quantize_with_same_params_collapses():
    builder = QDQBuilder()
    x = builder.quantize(builder.add_input("x", [2, 5]))
    scale, zero_point = builder.scales[x]
    out = builder.output(builder.quantize(x, scale=scale, zero_point=zero_point))
    _, lowered, before, after = lower_and_check(builder.model(), RemoveRedundantQuantization(),
                                                output_scales={out: (scale, zero_point)}, steps=0)
    assert count_ops(lowered) == {"QuantizeLinear": 1, "DequantizeLinear": 1}
    np.testing.assert_array_equal(before[out], after[out])


def test_requantization_is_kept():
    builder = QDQBuilder()
    x = builder.quantize(builder.add_input("x", [2, 5]))
    scale, zero_point = builder.scales[x]
    builder.output(builder.quantize(x, scale=scale * 2, zero_point=zero_point))
    lower_and_check(builder.model(), RemoveRedundantQuantization(), expect_modified=False)


def test_unread_quantize_dequantize_chain_is_removed_in_one_run():
    builder = QDQBuilder()
    x = builder.add_input("x", [3])
    builder.quantize(x)  # Q → DQ that nobody reads
    builder.output(builder.node("Relu", [x]))
    _, lowered, _, _ = lower_and_check(builder.model(), RemoveRedundantQuantization())
    assert count_ops(lowered) == {"Relu": 1} and not lowered.graph.initializer


def test_graph_interface_names_are_never_taken():
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    zero = numpy_helper.from_array(np.array(3, np.uint8), "z")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
         helper.make_node("QuantizeLinear", ["x", "s", "z"], ["yq"])],
        "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [4])],
        [helper.make_tensor_value_info("yq", TensorProto.UINT8, [4])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    lower_and_check(model, RemoveRedundantQuantization(), expect_modified=False)


def test_pair_between_two_integer_chains_collapses_and_a_float_reader_keeps_its_dequantize():
    builder = QDQBuilder(seed=2)
    x = builder.quantize(builder.add_input("x", [2, 5]))
    scale, zero_point = builder.scales[x]
    requantized = builder.quantize(x, scale=scale, zero_point=zero_point)  # Q → DQ → Q(same) → DQ
    out = builder.output(builder.node("Relu", [requantized]))
    builder.output(builder.node("Sigmoid", [x]))  # reads the first DQ as float
    _, lowered, before, after = lower_and_check(builder.model(), RemoveRedundantQuantization())
    assert count_ops(lowered) == {"QuantizeLinear": 1, "DequantizeLinear": 2, "Relu": 1, "Sigmoid": 1}
    np.testing.assert_array_equal(before[out], after[out])


def test_graph_output_quantize_hands_its_name_to_the_integer_tensor():
    builder = QDQBuilder(seed=2)
    x = builder.quantize(builder.add_input("x", [3, 4]))
    scale, zero_point = builder.scales[x]
    quantize = builder.node("QuantizeLinear", [x, builder.constant("s", np.float32(scale)),
                                               builder.constant("z", np.uint8(zero_point))])
    builder.output(quantize)
    model, lowered, before, after = lower_and_check(builder.model(), RemoveRedundantQuantization(),
                                                    output_scales={quantize: (scale, zero_point)}, steps=0)
    assert count_ops(lowered) == {"QuantizeLinear": 1}
    assert [output.name for output in lowered.graph.output] == [quantize]
    assert lowered.graph.node[0].output[0] == quantize  # the first Q now writes the graph output
    np.testing.assert_array_equal(before[quantize], after[quantize])


def test_same_per_channel_params_collapse_and_another_axis_does_not():
    def chain(second_axis: int):
        scale = numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "s")
        zero = numpy_helper.from_array(np.array([1, 2, 3], np.int8), "z")
        graph = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"], axis=1),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"], axis=1),
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["yq"], axis=second_axis),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], axis=second_axis)],
            "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [3, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])], [scale, zero])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        return onnx.shape_inference.infer_shapes(model)  # the DQ reads the integer type of its input

    _, lowered, before, after = lower_and_check(chain(1), RemoveRedundantQuantization())
    assert count_ops(lowered) == {"QuantizeLinear": 1, "DequantizeLinear": 1}
    np.testing.assert_array_equal(before["y"], after["y"])
    lower_and_check(chain(0), RemoveRedundantQuantization(), expect_modified=False)


def test_same_values_in_another_integer_type_are_kept(caplog):
    builder = QDQBuilder(seed=2)
    x = builder.quantize(builder.add_input("x", [2, 5]), scale=0.05, zero_point=0)
    builder.output(builder.quantize(x, scale=0.05, zero_point=0, dtype=np.int8))
    with caplog.at_level("INFO"):
        lower_and_check(builder.model(), RemoveRedundantQuantization(), expect_modified=False)
    assert "this pair requantizes" in caplog.text


def test_non_constant_scale_is_refused(caplog):
    builder = QDQBuilder(seed=2)
    x = builder.quantize(builder.add_input("x", [2, 5]))
    scale, zero_point = builder.scales[x]
    computed = builder.node("Identity", [builder.constant("s", np.float32(scale))])
    quantize = builder.node("QuantizeLinear", [x, computed, builder.constant("z", np.uint8(zero_point))])
    builder.output(builder.node("DequantizeLinear", [quantize, computed, builder.constant("z", np.uint8(zero_point))]))
    with caplog.at_level("INFO"):
        lower_and_check(builder.model(), RemoveRedundantQuantization(), expect_modified=False)
    assert "is not a constant initializer" in caplog.text


def test_a_graph_input_keeps_its_name_when_its_pair_collapses():
    """DQ(xq) → Q(same params) with ``xq`` a graph input: the Q output's readers may read ``xq`` directly, but the
    model's interface must not change (today the graph input is renamed after the Q output)."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(1, np.uint8), "z")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
         helper.make_node("QuantizeLinear", ["x", "s", "z"], ["yq"]),
         helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = RemoveRedundantQuantization()(ir.serde.deserialize_model(model))
    lowered = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(lowered, full_check=True)
    assert [value.name for value in lowered.graph.input] == ["xq"]
    assert [value.name for value in lowered.graph.output] == ["y"]
    before, after = run_both(model, lowered)
    np.testing.assert_array_equal(before["y"], after["y"])
    assert not RemoveRedundantQuantization()(result.model).modified


def test_an_integer_graph_output_keeps_its_name_when_its_pair_collapses():
    """The integer tensor of the pair is itself a graph output (and read by the DQ): the Q output's readers read it,
    and the interface keeps both names."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(1, np.uint8), "z")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["d"]),
         helper.make_node("QuantizeLinear", ["d", "s", "z"], ["yq"]),
         helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("xq", TensorProto.UINT8, [3]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = RemoveRedundantQuantization()(ir.serde.deserialize_model(model))
    assert result.modified
    lowered = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(lowered, full_check=True)
    assert [value.name for value in lowered.graph.output] == ["xq", "y"]
    assert [node.op_type for node in lowered.graph.node] == ["QuantizeLinear", "DequantizeLinear"]
    before, after = run_both(model, lowered)
    for name in ("xq", "y"):
        np.testing.assert_array_equal(before[name], after[name])
    assert not RemoveRedundantQuantization()(result.model).modified

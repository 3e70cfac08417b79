"""RemoveRedundantQuantization on hand-built DQ → Q pairs and unread Q/DQ chains."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qgraph.passes.lower.remove_redundant_quantization import RemoveRedundantQuantization
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


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

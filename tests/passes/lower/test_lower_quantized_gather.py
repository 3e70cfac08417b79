"""LowerQuantizedGather: an embedding lookup in an int8 table dequantizes only the rows it looked up."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from qgraph import runtime
from qgraph.passes.lower.lower_quantized_gather import LowerQuantizedGather
from tests.passes.lower.islands import ROWS, assert_refused, blocked_embedding_lookup
from tests.passes.lower.islands import embedding_lookup as lookup
from tests.passes.qdq_builders import count_ops, lower_and_check


def _every_row(model: onnx.ModelProto, lowered: onnx.ModelProto, ids_shape=(2, 3)) -> None:
    """Bit-identical on ids covering every row of the table (the checks' random ids only reach the first rows)."""
    ids = np.resize(np.arange(ROWS)[::-1], ids_shape).astype(np.int64)
    for start in range(0, ROWS, int(np.prod(ids_shape))):
        feeds = {"ids": ((ids + start) % ROWS).astype(np.int64)}
        before = runtime.run(runtime.create_session(model), feeds)
        after = runtime.run(runtime.create_session(lowered), feeds)
        for name in before:
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_per_column_table_is_looked_up_in_integers_then_scaled_on_the_rows_last_axis():
    model = lookup()
    lowered_ir, lowered, _, _ = lower_and_check(model, LowerQuantizedGather(), float_atol=0.0)
    _every_row(model, lowered)
    assert count_ops(lowered) == {"Gather": 1, "Cast": 1, "Mul": 1, "Tanh": 1}
    gather = next(node for node in lowered_ir.graph if node.op_type == "Gather")
    assert gather.inputs[0].name == "codes"  # the int8 codes, not a dequantized table
    (cast,) = gather.outputs[0].consumers()
    (multiply,) = cast.outputs[0].consumers()
    assert cast.op_type == "Cast" and multiply.op_type == "Mul" and multiply.inputs[1].name == "scale"
    assert multiply.outputs[0].name == "rows"  # readers and names unchanged


def test_a_zero_point_is_subtracted_before_the_scale():
    model = lookup(zero_point_value=3)
    _, lowered, _, _ = lower_and_check(model, LowerQuantizedGather(), float_atol=0.0)
    _every_row(model, lowered)
    assert count_ops(lowered) == {"Gather": 1, "Cast": 1, "Sub": 1, "Mul": 1, "Tanh": 1}


def test_per_row_table_looks_up_its_scales_and_zero_points_with_the_rows():
    for zero_point_value, expected in ((0, {"Gather": 2, "Unsqueeze": 1, "Cast": 1, "Mul": 1, "Tanh": 1}),
                                       (3, {"Gather": 3, "Unsqueeze": 2, "Cast": 1, "Sub": 1, "Mul": 1, "Tanh": 1})):
        model = lookup(dequantize_axis=0, zero_point_value=zero_point_value)
        lowered_ir, lowered, _, _ = lower_and_check(model, LowerQuantizedGather(), float_atol=0.0)
        _every_row(model, lowered)
        assert count_ops(lowered) == expected
        scale_lookup = next(node for node in lowered_ir.graph if node.op_type == "Gather"
                            and node.inputs[0].name == "scale")
        assert scale_lookup.inputs[1].name == "ids"


def test_per_tensor_table_and_a_missing_zero_point():
    for options, dequantize in (({"per_tensor": True}, 1), ({"zero_point": False}, 0), ({"ids_shape": (7,)}, 0)):
        model = lookup(**options)
        _, lowered, _, _ = lower_and_check(model, LowerQuantizedGather(), float_atol=0.0)
        _every_row(model, lowered, options.get("ids_shape", (2, 3)))
        assert count_ops(lowered).get("DequantizeLinear", 0) == dequantize


def test_two_lookups_of_one_table_each_read_the_codes():
    model = lookup(second_lookup=True)
    _, lowered, _, _ = lower_and_check(model, LowerQuantizedGather(), float_atol=0.0)
    _every_row(model, lowered)
    assert count_ops(lowered) == {"Gather": 2, "Cast": 2, "Mul": 2, "Tanh": 1}


def test_refusals(caplog):
    assert_refused(lookup(gather_axis=1, ids_shape=(3,)), LowerQuantizedGather(), caplog, "along axis 1")
    assert_refused(lookup(whole_table_output=True), LowerQuantizedGather(), caplog,
                   "the dequantized table is a graph output")


def test_a_table_also_read_whole_is_left_alone(caplog):
    model = lookup()
    graph = model.graph
    graph.node.append(helper.make_node("ReduceMax", ["table"], ["largest"], name="whole", keepdims=0))
    graph.output.append(helper.make_tensor_value_info("largest", TensorProto.FLOAT, []))
    assert_refused(model, LowerQuantizedGather(), caplog, "ReduceMax whole reads the whole dequantized table")


def test_a_weight_only_table_in_blocks_looks_up_8_bit_codes_and_their_blocks_parameters():
    """4-bit codes are held in 8 bits for the lookup (ONNX's Gather takes no 4-bit type); each looked-up row is cut
    into its blocks, less its blocks' zero points, times their scales: the blocked DequantizeLinear's values."""
    for signed, bits in ((True, 4), (False, 4), (False, 8)):
        model = blocked_embedding_lookup(signed=signed, bits=bits)
        lowered_ir, lowered, _, _ = lower_and_check(model, LowerQuantizedGather(), float_atol=0.0)
        _every_row(model, lowered)
        ops = count_ops(lowered)
        assert "DequantizeLinear" not in ops and ops["Reshape"] == 2 and ops["Mul"] == 1
        assert ops.get("Sub", 0) == (0 if signed else 1)  # signed codes here are symmetric: no zero point
        lookup = next(node for node in lowered_ir.graph if node.op_type == "Gather" and node.inputs[1].name == "ids"
                      and node.inputs[0].dtype in (ir.DataType.INT8, ir.DataType.UINT8))
        assert lookup.inputs[0].const_value is not None


def test_blocked_refusals(caplog):
    assert_refused(blocked_embedding_lookup(columns=10), LowerQuantizedGather(), caplog, "partial block of 4")
    assert_refused(blocked_embedding_lookup(axis=0), LowerQuantizedGather(), caplog, "down its columns")

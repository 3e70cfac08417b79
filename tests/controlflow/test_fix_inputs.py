"""fix_inputs: a graph input becomes a checked constant initializer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qgraph.errors import QGraphError
from qgraph.ir.fix_inputs import fix_inputs, parse_assignment, parse_input_value
from tests.controlflow.models import speech_model


def _flags_model() -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["flags"], ["as_float"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "as_float"], ["y"]),
         helper.make_node("Mul", ["y", "gain"], ["z"])],
        "flags",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("flags", TensorProto.BOOL, [3]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("grid", TensorProto.INT32, [2, "n"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_fixed_input_becomes_an_initializer():
    model = fix_inputs(ir.serde.deserialize_model(speech_model()), {"sample_rate": "16000"})
    assert [value.name for value in model.graph.inputs] == ["audio"]
    value = model.graph.initializers["sample_rate"]
    assert value.const_value.numpy().dtype == np.int64 and value.const_value.numpy().shape == ()
    assert int(value.const_value.numpy()) == 16000
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_text_values_parse_in_the_input_type():
    model = _flags_model()
    np.testing.assert_array_equal(parse_input_value(model, "flags", "1,0,true"), [True, False, True])
    np.testing.assert_allclose(parse_input_value(model, "gain", "0.5,2"), [0.5, 2.0])
    assert parse_input_value(model, "gain", "3").shape == (1,)
    fixed = fix_inputs(model, {"flags": "1,0,1", "gain": np.array([2.0])})
    assert [value.name for value in fixed.graph.inputs] == ["x", "grid"]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("nope", "1", "no input named 'nope' (its inputs: x, flags, gain, grid)"),
        ("flags", "1,0", "shape (3,) (3 values), got 2 value(s)"),
        ("flags", "maybe,0,1", "'maybe' is not a bool value"),
        ("grid", "1.5", "'1.5' is not a int32 value"),
        ("grid", "1,2", "symbolic dimension"),
        ("gain", "1,,2", "holds an empty value"),
    ],
)
def test_bad_values_are_refused_with_the_input_named(name, text, message):
    with pytest.raises(QGraphError, match="--fix-input " + name) as caught:
        fix_inputs(_flags_model(), {name: text})
    assert message in str(caught.value)


def test_out_of_range_and_inexact_values_are_refused():
    model = ir.serde.deserialize_model(speech_model())
    with pytest.raises(QGraphError, match="outside the range of int64"):
        parse_input_value(model, "sample_rate", str(2**70))
    with pytest.raises(QGraphError, match="do not fit the input's element type int64"):
        fix_inputs(model, {"sample_rate": np.float64(16000.5)})
    fixed = fix_inputs(ir.serde.deserialize_model(speech_model()), {"sample_rate": np.float64(16000.0)})
    assert fixed.graph.initializers["sample_rate"].const_value.numpy().dtype == np.int64


def test_assignments_need_a_name_and_a_value():
    assert parse_assignment(" sample_rate = 16000 ") == ("sample_rate", "16000")
    for text in ("sample_rate", "=1", "x="):
        with pytest.raises(QGraphError, match="NAME=VALUE"):
            parse_assignment(text)

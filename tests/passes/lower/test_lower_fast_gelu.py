"""LowerFastGelu: an exact GELU read only by a coarse-enough QuantizeLinear becomes com.microsoft FastGelu."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.passes.lower.lower_fast_gelu import MINIMUM_OUTPUT_SCALE, LowerFastGelu
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import count_ops, lower_and_check

#: A BERT FFN activation's uint8 quantization: GELU over about [-0.17, 10].
SCALE, ZERO_POINT = 0.04, 4


def quantized_gelu(*, scale: float = SCALE, opset: int = 17, standard: bool = False, approximate: str | None = None,
                float_reader: bool = False) -> onnx.ModelProto:
    """x → Gelu → Q(scale) → DQ → y (plus y_float = Gelu + 1 when ``float_reader``)."""
    attributes = {"approximate": approximate} if approximate else {}
    nodes = [
        helper.make_node("Gelu", ["x"], ["g"], name="gelu", domain="" if standard else "com.microsoft", **attributes),
        helper.make_node("QuantizeLinear", ["g", "s", "z"], ["q"], name="quantize"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequantize"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 3072])]
    if float_reader:
        nodes.append(helper.make_node("Add", ["g", "one"], ["y_float"], name="float_reader"))
        outputs.append(helper.make_tensor_value_info("y_float", TensorProto.FLOAT, [8, 3072]))
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3072])], outputs,
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.uint8(ZERO_POINT), "z"),
         numpy_helper.from_array(np.array(1, np.float32), "one")],
    )
    imports = [helper.make_opsetid("", opset)] + ([] if standard else [helper.make_opsetid("com.microsoft", 1)])
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


def _codes(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    proto.graph.output.append(helper.make_tensor_value_info("q", TensorProto.UINT8, [8, 3072]))
    return runtime.create_session(proto).run(["q"], {"x": x})[0].astype(np.int32)


@pytest.mark.parametrize("standard", [False, True], ids=["com.microsoft", "opset-20"])
def test_exact_gelu_becomes_fast_gelu_within_one_step(standard):
    model = quantized_gelu(standard=standard, opset=20 if standard else 17)
    lowered_ir, lowered, _, _ = lower_and_check(model, LowerFastGelu(), output_scales={"y": (SCALE, ZERO_POINT)})
    assert count_ops(lowered) == {"FastGelu": 1, "QuantizeLinear": 1, "DequantizeLinear": 1}
    fast = next(node for node in lowered_ir.graph if node.op_type == "FastGelu")
    assert fast.domain == "com.microsoft" and len(fast.inputs) == 1
    # the codes move by at most one step, and only near rounding boundaries (|x| around 2.7 where tanh is worst)
    x = np.random.default_rng(3).standard_normal((8, 3072)).astype(np.float32) * 3
    before, after = _codes(model, x), _codes(lowered, x)
    assert np.abs(before - after).max() <= 1
    assert 0 < np.mean(before != after) < 0.02


def test_a_fine_output_scale_is_refused(caplog):
    assert_refused(quantized_gelu(scale=MINIMUM_OUTPUT_SCALE / 2), LowerFastGelu(), caplog, "quarter step")


def test_a_float_reader_is_refused(caplog):
    assert_refused(quantized_gelu(float_reader=True), LowerFastGelu(), caplog, "read as float by Add")


def test_the_tanh_gelu_is_left_alone():
    result = LowerFastGelu()(ir.serde.deserialize_model(quantized_gelu(standard=True, opset=20, approximate="tanh")))
    assert not result.modified

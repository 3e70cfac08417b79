"""StoreInt4Weights: 4-bit codes held as int8 behind DequantizeLinear become int4 (opset 21), bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest

from qgraph import runtime
from qgraph.ir.values import default_opset
from qgraph.passes.lower import store_int4_weights
from qgraph.passes.lower.store_int4_weights import (
    StoreInt4Weights,
    qlinear_matmul_nodes,
    runtime_runs_qlinear_matmul_at_21,
)
from tests.passes.lower.four_bit_models import four_bit_conv, four_bit_gemm, four_bit_matmul
from tests.passes.qdq_builders import QDQBuilder, lower_and_check


def _weight_dequantizers(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == "DequantizeLinear" and node.inputs[0].is_initializer()
            and node.inputs[0].dtype != ir.DataType.INT32]


def _stored_and_check(proto: onnx.ModelProto) -> tuple[ir.Model, onnx.ModelProto]:
    """StoreInt4Weights on ``proto``: valid before and after, outputs bit for bit equal, idempotent."""
    model, stored, before, after = lower_and_check(proto, StoreInt4Weights(), float_atol=0.0)
    for name, expected in before.items():
        np.testing.assert_array_equal(after[name], expected, err_msg=name)
    return model, stored


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_weight_is_stored_as_int4_bit_for_bit(per_channel):
    builder, _ = four_bit_matmul(per_channel=per_channel)
    original = builder.model()
    model, stored = _stored_and_check(original)
    (dequantize,) = _weight_dequantizers(model)
    assert dequantize.inputs[0].dtype == ir.DataType.INT4 and dequantize.inputs[2].dtype == ir.DataType.INT4
    codes = dequantize.inputs[0].const_value.numpy().astype(np.int8)
    original_codes = next(onnx.numpy_helper.to_array(tensor) for tensor in original.graph.initializer
                          if tensor.data_type == onnx.TensorProto.INT8 and tensor.dims)
    np.testing.assert_array_equal(codes, original_codes)
    # two codes per byte: the stored weight is half the int8 one (40 × 6 codes: 240 bytes -> 120)
    sizes = {tensor.data_type: len(tensor.raw_data) for tensor in stored.graph.initializer if len(tensor.dims) == 2}
    assert sizes == {onnx.TensorProto.INT4: 120}


def test_an_older_model_is_upgraded_to_opset_21_checked_and_exact():
    builder, _ = four_bit_matmul(opset=17)
    model, stored = _stored_and_check(builder.model())
    assert default_opset(model) == 21
    assert [opset.version for opset in stored.opset_import if opset.domain in ("", "ai.onnx")] == [21]


def test_conv_and_gemm_weights_and_int32_biases():
    for builder, _ in (four_bit_conv(), four_bit_gemm()):
        model, _ = _stored_and_check(builder.model())
        dtypes = sorted(str(node.inputs[0].dtype) for node in model.graph
                        if node.op_type == "DequantizeLinear" and node.inputs[0].is_initializer())
        assert dtypes == ["INT32", "INT4"]  # the bias stays int32


def test_uint8_codes_in_the_uint4_range_become_uint4():
    builder = QDQBuilder(seed=2)
    builder.opset = 21
    x = builder.add_input("x", [2, 4])
    codes = builder.constant("codes", np.random.default_rng(2).integers(0, 16, (4, 3)).astype(np.uint8))
    weight = builder.node("DequantizeLinear", [codes, builder.constant("scale", np.float32(0.1)),
                                               builder.constant("zero", np.uint8(9))])
    builder.output(builder.node("MatMul", [x, weight]))
    model, _ = _stored_and_check(builder.model())
    (dequantize,) = _weight_dequantizers(model)
    assert dequantize.inputs[0].dtype == ir.DataType.UINT4 and dequantize.inputs[2].dtype == ir.DataType.UINT4


def test_eight_bit_weights_are_refused(caplog):
    builder = QDQBuilder(seed=4)
    builder.opset = 21
    x = builder.quantize(builder.add_input("x", [2, 8]))
    weight, _ = builder.weight(np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32), axis=1)
    builder.output(builder.quantize(builder.node("MatMul", [x, weight])))
    with caplog.at_level("INFO"):
        lower_and_check(builder.model(), StoreInt4Weights(), expect_modified=False)
    # the pass does not even consider a model with nothing 4-bit: no upgrade, no refusal to log per node
    assert "int4" not in caplog.text
    with caplog.at_level("INFO"):
        result = StoreInt4Weights().call(ir.serde.deserialize_model(builder.model()))
    assert not result.modified


def test_a_mixed_model_stores_only_the_four_bit_weight(caplog):
    builder, out = four_bit_matmul(quantized_output=True)
    other, _ = builder.weight(np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32), axis=1, bits=8)
    builder.output(builder.quantize(builder.node("MatMul", [out, other])))
    with caplog.at_level("INFO"):
        model, _ = _stored_and_check(builder.model())
    assert sorted(str(node.inputs[0].dtype) for node in _weight_dequantizers(model)) == ["INT4", "INT8"]
    assert "beyond the 4-bit range [-8, 7] (an 8-bit weight)" in caplog.text


def test_the_upgrade_is_refused_where_onnxruntime_lacks_qlinear_matmul_21(caplog, monkeypatch):
    """A QDQ MatMul of two 8-bit activations becomes QLinearMatMul in onnxruntime's optimiser, which 1.19 lacks at
    opset 21: the weights stay int8 codes, the model stays at its opset, and the log says why."""
    builder, out = four_bit_matmul(opset=17)
    other = builder.quantize(builder.add_input("y", [6, 2]))
    builder.output(builder.quantize(builder.node("MatMul", [out, other])))
    proto = builder.model()
    model = ir.serde.deserialize_model(proto)
    assert len(qlinear_matmul_nodes(model, frozenset(_weight_dequantizers(model)))) == 1
    monkeypatch.setattr(store_int4_weights, "runtime_runs_qlinear_matmul_at_21", lambda: False)
    with caplog.at_level("WARNING"):
        lower_and_check(proto, StoreInt4Weights(), expect_modified=False)
    assert "1 4-bit weights stay int8 codes (opset 17)" in caplog.text
    assert "has no QLinearMatMul kernel at opset 21, and 1 node(s) would become one" in caplog.text
    monkeypatch.setattr(store_int4_weights, "runtime_runs_qlinear_matmul_at_21", lambda: True)
    upgraded, _ = _stored_and_check(proto)
    assert default_opset(upgraded) == 21


def test_the_runtime_probe_reads_the_installed_onnxruntime():
    release = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    if release == (1, 19):
        assert not runtime_runs_qlinear_matmul_at_21()
    elif release >= (1, 32):
        assert runtime_runs_qlinear_matmul_at_21()


def test_a_stored_model_runs_with_full_graph_optimisation():
    """What a user's session does: onnxruntime's optimiser must load the int4 model and compute the same values
    (it runs DequantizeLinear → float MatMul: no int4 integer kernel exists)."""
    builder, out = four_bit_matmul(rows=64, columns=16, opset=17)
    proto = builder.model()
    _, stored = _stored_and_check(proto)
    feeds = runtime.random_inputs(runtime.create_session(proto), seed=3)
    expected = runtime.run(runtime.create_session(proto), feeds)[out]
    optimised = runtime.run(runtime.create_session(stored, optimize=True), feeds)[out]
    scale = builder.scales[out][0]
    assert np.abs(optimised - expected).max() <= scale * (1 + 1e-5)

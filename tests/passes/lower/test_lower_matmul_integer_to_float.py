"""LowerMatMulIntegerToFloat on QDQ MatMul islands with a float output, with and without the bias Add."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.passes.lower.lower_matmul_integer_to_float import LowerMatMulIntegerToFloat
from tests.passes.lower.islands import matmul_model
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


def _projection(*, bias_first: bool, per_channel: bool = True, three_d: bool = True):
    """a ─ Q/DQ ─▶ MatMul(DQ(W)) ─▶ Add(b) ─▶ float output (a transformer projection)."""
    builder = QDQBuilder(seed=5)
    rng = np.random.default_rng(5)
    a = builder.quantize(builder.add_input("a", [2, 5, 8] if three_d else [5, 8]))
    weight, _ = builder.weight(rng.standard_normal((8, 6)).astype(np.float32), axis=1 if per_channel else None)
    y = builder.node("MatMul", [a, weight])
    bias = builder.constant("bias", rng.standard_normal(6).astype(np.float32))
    y = builder.node("Add", [bias, y] if bias_first else [y, bias])
    return builder, builder.output(y)


@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
def test_projection_and_its_bias_become_one_kernel(bias_first, per_channel):
    builder, _ = _projection(bias_first=bias_first, per_channel=per_channel)
    model, lowered, _, _ = lower_and_check(builder.model(), LowerMatMulIntegerToFloat(guard_saturation=False),
                                           float_atol=1e-4)
    assert count_ops(lowered) == {"QuantizeLinear": 1, "MatMulIntegerToFloat": 1}
    kernel = next(node for node in model.graph if node.op_type == "MatMulIntegerToFloat")
    assert kernel.domain == "com.microsoft" and len(kernel.inputs) == 7
    assert kernel.inputs[1].dtype == ir.DataType.INT8


def test_without_a_bias_and_with_the_saturation_guard():
    builder, _ = matmul_model(quantized_output=False, three_d=True)
    model, lowered, _, _ = lower_and_check(builder.model(), LowerMatMulIntegerToFloat(), float_atol=1e-4)
    assert count_ops(lowered) == {"QuantizeLinear": 1, "MatMulIntegerToFloat": 1}
    kernel = next(node for node in model.graph if node.op_type == "MatMulIntegerToFloat")
    assert len(kernel.inputs) == 6 and kernel.inputs[1].dtype == ir.DataType.UINT8  # 8-bit codes widened


def test_quantized_outputs_and_activation_operands_are_left_alone():
    builder, _ = matmul_model(quantized_output=True)
    lower_and_check(builder.model(), LowerMatMulIntegerToFloat(), expect_modified=False)
    builder = QDQBuilder(seed=2)
    a = builder.quantize(builder.add_input("a", [5, 8]))
    b = builder.quantize(builder.add_input("b", [8, 6]))
    builder.output(builder.node("MatMul", [a, b]))
    lower_and_check(builder.model(), LowerMatMulIntegerToFloat(), expect_modified=False)

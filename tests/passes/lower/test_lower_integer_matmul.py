"""LowerIntegerMatMul on hand-built QDQ MatMul islands whose output stays float."""

from __future__ import annotations

from qgraph.passes.lower.lower_integer_matmul import LowerIntegerMatMul
from qgraph.passes.lower.lower_qlinear_matmul import LowerQLinearMatMul
from tests.passes.lower.islands import matmul_model
from tests.passes.qdq_builders import count_ops, lower_and_check


def test_float_output_lowers_to_matmulinteger_and_rescale():
    builder, out = matmul_model(quantized_output=False)
    model = builder.model()
    lower_and_check(model, LowerQLinearMatMul(), expect_modified=False)
    _, lowered, _, _ = lower_and_check(model, LowerIntegerMatMul())
    assert count_ops(lowered) == {"QuantizeLinear": 1, "MatMulInteger": 1, "Cast": 1, "Mul": 1}


def test_integer_matmul_leaves_quantized_output_alone():
    builder, _ = matmul_model(quantized_output=True)
    lower_and_check(builder.model(), LowerIntegerMatMul(), expect_modified=False)

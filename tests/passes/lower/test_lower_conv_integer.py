"""LowerConvInteger on hand-built QDQ Conv islands whose output stays float."""

from __future__ import annotations

import numpy as np

from qgraph.passes.lower.lower_conv_integer import LowerConvInteger
from qgraph.passes.lower.lower_qlinear_conv import LowerQLinearConv
from tests.passes.lower.islands import conv_island
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


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

"""The plan's coverage on an encoder counts the nodes that compute float values, not its shape arithmetic."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from qgraph.annotate.annotator import annotate
from qgraph.models.bert import BertLayout, BertOptions, build_bert
from qgraph.targets import get_target

LAYOUT = BertLayout(layers=2, hidden=64, heads=4, intermediate=256, vocabulary=256, max_positions=64)


def test_shape_arithmetic_is_left_out_of_the_coverage():
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(build_bert(LAYOUT, options=BertOptions())))
    plan = annotate(model, get_target("ort-cpu").rules())
    nodes = {node.name: node for node in model.graph}
    op_types = {nodes[name].op_type for name in plan.index_nodes}
    assert "Shape" in op_types and plan.index_nodes <= set(plan.fp32_nodes)
    # every node left out computes only non-float values; every float FP32 node (LayerNorm, Softmax) stays in
    assert all(output.dtype not in (ir.DataType.FLOAT, None) for name in plan.index_nodes
               for output in nodes[name].outputs)
    assert not {name for name in plan.fp32_nodes if nodes[name].op_type in ("Softmax", "LayerNormalization")} \
        & plan.index_nodes
    counted = len(plan.quantized_nodes) + len(plan.fp32_nodes) - len(plan.index_nodes)
    assert plan.coverage == len(plan.quantized_nodes) / counted
    assert plan.coverage > len(plan.quantized_nodes) / (len(plan.quantized_nodes) + len(plan.fp32_nodes))

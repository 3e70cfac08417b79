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


def test_embedding_tables_are_planned_as_int8_weights_per_row():
    """The 2048-row vocabulary is looked up in int8 on ort-cpu; the 256-row position and 2-row token-type tables
    stay float (a dequantization of nearly every row per run, for little memory), and TensorRT keeps every table
    float."""
    from qgraph.annotate.annotator import EMBEDDING_AXIS, EMBEDDING_MINIMUM_ROWS, AnnotationOverrides

    layout = BertLayout(layers=1, hidden=64, heads=4, intermediate=128, vocabulary=2048, max_positions=256)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(build_bert(layout, options=BertOptions())))
    gathers = {node.name: node for node in model.graph if node.op_type == "Gather" and node.inputs[0].is_initializer()}
    rows = {name: node.inputs[0].shape[0] for name, node in gathers.items()}
    plan = annotate(model, get_target("ort-cpu").rules())
    planned = {weight.consumer: weight for weight in plan.weights if weight.consumer in gathers}
    assert sorted(rows.values()) == [2, 256, 2048] and EMBEDDING_MINIMUM_ROWS > 256
    assert set(planned) == {name for name, count in rows.items() if count == 2048}
    assert EMBEDDING_AXIS == 0 and all(weight.axis == 0 and weight.name == gathers[name].inputs[0].name
               for name, weight in planned.items())
    assert set(planned) <= set(plan.quantized_nodes)
    assert not {gathers[name].outputs[0].name for name in planned} & set(plan.activations)  # the rows stay float
    excluded = annotate(model, get_target("ort-cpu").rules(), AnnotationOverrides(exclude=frozenset({"Gather"})))
    assert not {weight.consumer for weight in excluded.weights} & set(gathers)
    tensorrt = annotate(model, get_target("tensorrt").rules())
    assert not {weight.consumer for weight in tensorrt.weights} & set(gathers)


def _tied_lookup_and_head(vocabulary: int = 2048, hidden: int = 64) -> onnx.ModelProto:
    """Gather(E, ids) → Tanh → Gemm(·, E, transB=1): the output projection tied to the embedding table itself."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    table = (np.random.default_rng(0).standard_normal((vocabulary, hidden)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
             helper.make_node("Tanh", ["x"], ["t"], name="tanh"),
             helper.make_node("Reshape", ["t", "shape"], ["rows"], name="flat"),
             helper.make_node("Gemm", ["rows", "E"], ["logits"], transB=1, name="head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", vocabulary])],
                              [numpy_helper.from_array(table, "E"),
                               numpy_helper.from_array(np.array([-1, hidden], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_table_tied_to_an_output_projection_is_quantized_per_row_for_both():
    """The tied Gemm (transB=1) quantizes the table per row, its output channels, and so does the lookup: one
    axis, one set of scales, both readers int8 (per column for the lookup gave the tied QGemm a zero point of the
    wrong size); a table that another kind of node reads stays float for the lookup."""
    import numpy as np

    from qgraph import runtime
    from qgraph.pipeline import OptimizeOptions, optimize
    from qgraph.ptq import QuantizeOptions

    model = _tied_lookup_and_head()
    plan = annotate(ir.serde.deserialize_model(model), get_target("ort-cpu").rules())
    assert sorted((weight.name, weight.consumer, weight.axis) for weight in plan.weights) == [
        ("E", "embed", 0), ("E", "head", 0)]
    rng = np.random.default_rng(1)
    batches = [{"ids": rng.integers(0, 2048, (4, 8)).astype(np.int64)} for _ in range(3)]
    options = OptimizeOptions(quantization=QuantizeOptions(min_sqnr=None, speed_choice=False))
    quantized = ir.serde.serialize_model(optimize(ir.serde.deserialize_model(model), None, options,
                                                  calibration_data=batches).model)
    op_types = [node.op_type for node in quantized.graph.node]
    assert op_types.count("QGemm") == 1 and "DequantizeLinear" not in op_types
    floats = [tensor.name for tensor in quantized.graph.initializer
              if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 2]
    assert not floats  # no float copy of the table left
    feeds = {"ids": rng.integers(0, 2048, (2, 8)).astype(np.int64)}
    reference = runtime.run(runtime.create_session(model), feeds)["logits"]
    result = runtime.run(runtime.create_session(quantized), feeds)["logits"]
    assert np.sum(reference * result) / (np.linalg.norm(reference) * np.linalg.norm(result)) > 0.999
    model.graph.node.append(onnx.helper.make_node("ReduceMax", ["E"], ["largest"], name="whole", keepdims=0))
    model.graph.output.append(onnx.helper.make_tensor_value_info("largest", onnx.TensorProto.FLOAT, []))
    read_whole = annotate(ir.serde.deserialize_model(model), get_target("ort-cpu").rules())
    assert [(weight.consumer, weight.axis) for weight in read_whole.weights] == [("head", 0)]
